"""The tool library of the synthetic function-calling data.

Each `ToolDef` holds:

- an OpenAI tool spec whose parameters are a JSON Schema. The seven builtin tools of
  `codeling chat` take their spec from `codeling.tools.BUILTIN_TOOLS`, so the training data lists
  them exactly as the chat does;
- one value generator per parameter, so every generated argument has the schema's JSON type;
- user request templates with `{param}` placeholders. The generated values are written into the
  text, so a model can copy them into the call. A template may also fix arguments that its
  wording implies, such as `{"verbose": True}` for "run the tests verbosely";
- vague requests that leave out exactly one required argument, for clarifying questions;
- `respond`, which simulates the tool's result from the arguments and writes the assistant's
  final answer from that result. The builtin tools return the same formats as
  `codeling.tools.ToolBox`.

Request templates come in two pools: training phrasings and evaluation-only phrasings. Template
ids are `TOOL/tN` (training), `TOOL/eN` (evaluation), `TOOL/vN` and `TOOL/veN` (vague).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import random
import re
import string
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from codeling.tools import BUILTIN_TOOLS

Rng = random.Random
Responder = Callable[[Mapping[str, Any], Rng], tuple[str, str]]

JSON_TYPES = ("string", "integer", "number", "boolean", "array")


# -- parameters, templates and tools ---------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One tool parameter: its JSON Schema and a generator of realistic values."""

    name: str
    type: str
    description: str
    generate: Callable[[Rng], Any]
    required: bool = True
    enum: tuple[str, ...] | None = None
    items: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    ask: tuple[str, ...] = ()  # clarifying questions when a request leaves this value out

    def schema(self) -> dict[str, Any]:
        """Return the JSON Schema of this parameter."""
        schema: dict[str, Any] = {"type": self.type}
        if self.type == "array":
            schema["items"] = {"type": self.items}
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(frozen=True)
class Template:
    """A user request with `{param}` placeholders and `[a|b|c]` choices.

    `fixed` contains the arguments that its wording implies, such as {"verbose": True}. A
    choice group stands for one of its alternatives, the empty one included, so
    "[please |]show me {path}." reads "Please show me {path}." or "Show me {path}."; an
    alternative may hold placeholders. Groups do not nest. `expand` picks one alternative per
    group, `expansions` lists every combination. An expansion starts with a capital letter and
    loses the spaces that an empty alternative leaves behind.
    """

    id: str
    text: str
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def parts(self) -> tuple[tuple[str, ...], ...]:
        """Return the text as a sequence of choices. Literal text is a choice of one."""
        parts: list[tuple[str, ...]] = []
        for index, piece in enumerate(re.split(r"\[([^\[\]]*)\]", self.text)):
            if index % 2:
                parts.append(tuple(piece.split("|")))
            elif "[" in piece or "]" in piece:
                raise ValueError(f"{self.id}: unbalanced or nested [ ] in {self.text!r}")
            elif piece:
                parts.append((piece,))
        return tuple(parts)

    @property
    def has_choices(self) -> bool:
        """True when some group offers more than one alternative."""
        return any(len(choices) > 1 for choices in self.parts)

    def expand(self, rng: Rng) -> Template:
        """Return a plain template with one alternative of every group, drawn from `rng`.

        A template without choices is returned as it is and draws nothing.
        """
        if not self.has_choices:
            return self
        return self._plain([rng.choice(choices) for choices in self.parts])

    def expansions(self) -> Iterator[Template]:
        """Yield every plain template that this one expands to."""
        for combination in itertools.product(*self.parts):
            yield self._plain(combination)

    def _plain(self, pieces: Sequence[str]) -> Template:
        # An empty alternative can leave a double space or a space before punctuation, and a
        # lowercase first word: "[please |]show me {path} [now|]." reads "Show me {path}."
        text = re.sub(r" +([.,?!:])", r"\1", re.sub(r"  +", " ", "".join(pieces))).strip(" ")
        return Template(self.id, text[:1].upper() + text[1:], self.fixed)

    @functools.cached_property
    def fields(self) -> tuple[str, ...]:
        """Placeholder names in text order (of a plain template)."""
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.text) if name)

    @property
    def starts_with_text(self) -> bool:
        """True when the text starts with literal words, so its first letter may be lowercased."""
        return not self.text.startswith("{")


@dataclass(frozen=True, eq=False)
class ToolDef:
    """A tool of the synthetic data: spec, value generators, phrasings and simulated results."""

    name: str
    description: str
    group: str  # "developer" or "everyday"
    params: tuple[Param, ...]
    requests: tuple[Template, ...]
    eval_requests: tuple[Template, ...]
    vague: tuple[Template, ...]
    eval_vague: tuple[Template, ...]
    respond: Responder
    joint: Callable[[dict[str, Any], Rng], None] | None = None  # makes sampled values consistent
    builtin_spec: Mapping[str, Any] | None = None

    def spec(self) -> dict[str, Any]:
        """Return the OpenAI tool spec: {"type": "function", "function": {...}}."""
        if self.builtin_spec is not None:
            return json.loads(json.dumps(self.builtin_spec))
        parameters = {
            "type": "object",
            "properties": {param.name: param.schema() for param in self.params},
            "required": [param.name for param in self.params if param.required],
        }
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": parameters}}

    def param(self, name: str) -> Param:
        """Return the parameter called `name`."""
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(f"tool {self.name} has no parameter {name!r}")

    def sample_values(self, rng: Rng) -> dict[str, Any]:
        """Draw a value for every parameter, optional ones included."""
        values = {param.name: param.generate(rng) for param in self.params}
        if self.joint is not None:
            self.joint(values, rng)
        return values

    def arguments(self, template: Template, values: Mapping[str, Any],
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """Return the call's arguments: the values that a template mentions, plus `extra`.

        The arguments are in schema order.
        """
        named = set(template.fields) | set(template.fixed) | set(extra)
        merged = {**values, **template.fixed}
        return {param.name: merged[param.name] for param in self.params if param.name in named}

    def missing(self, template: Template) -> list[str]:
        """Return the required parameters that a template neither mentions nor fixes."""
        named = set(template.fields) | set(template.fixed)
        return [param.name for param in self.params if param.required and param.name not in named]


def _templates(tool: str, kind: str, phrases: tuple[str | tuple[str, dict], ...]
               ) -> tuple[Template, ...]:
    result = []
    for index, phrase in enumerate(phrases):
        text, fixed = (phrase, {}) if isinstance(phrase, str) else phrase
        result.append(Template(f"{tool}/{kind}{index}", text, dict(fixed)))
    return tuple(result)


def _tool(name: str, description: str, group: str, params: list[Param], *,
          requests: tuple, eval_requests: tuple, respond: Responder, vague: tuple = (),
          eval_vague: tuple = (), joint: Callable[[dict[str, Any], Rng], None] | None = None
          ) -> ToolDef:
    builtin = {tool["function"]["name"]: tool for tool in BUILTIN_TOOLS}.get(name)
    if builtin is not None:
        description = builtin["function"]["description"]
    return ToolDef(name=name, description=description, group=group, params=tuple(params),
                   requests=_templates(name, "t", requests + _REQUEST_GRAMMAR.get(name, ())),
                   eval_requests=_templates(name, "e", eval_requests),
                   vague=_templates(name, "v", vague + _VAGUE_GRAMMAR.get(name, ())),
                   eval_vague=_templates(name, "ve", eval_vague),
                   respond=respond, joint=joint, builtin_spec=builtin)


def text_of(value: Any) -> str:
    """Write a generated value into user text: lists as "a, b and c", numbers as in JSON."""
    if isinstance(value, list):
        words = [text_of(item) for item in value]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _number(value: float) -> int | float:
    """Round to 2 decimals and drop a zero fraction, so the text and JSON forms agree."""
    value = round(value, 2)
    return int(value) if value == int(value) else value


# -- value pools ------------------------------------------------------------------------------

CITIES = ("Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lisbon", "Cairo", "Toronto",
          "Chicago", "Seattle", "Sydney", "Mumbai", "Nairobi", "Lima", "Dublin", "Vienna",
          "Prague", "Seoul", "Austin", "Boston", "Denver", "Athens", "Helsinki", "Warsaw",
          "Zurich", "Montreal", "Singapore", "Istanbul", "Buenos Aires", "Mexico City",
          "Cape Town", "San Francisco", "New York", "Hong Kong", "Kyoto", "Amsterdam", "Stockholm")
# Standard-time UTC offsets in hours; daylight saving time is ignored.
UTC_OFFSETS = {"Paris": 1, "Tokyo": 9, "Berlin": 1, "Madrid": 1, "Rome": 1, "Oslo": 1,
               "Lisbon": 0, "Cairo": 2, "Toronto": -5, "Chicago": -6, "Seattle": -8, "Sydney": 10,
               "Mumbai": 5.5, "Nairobi": 3, "Lima": -5, "Dublin": 0, "Vienna": 1, "Prague": 1,
               "Seoul": 9, "Austin": -6, "Boston": -5, "Denver": -7, "Athens": 2, "Helsinki": 2,
               "Warsaw": 1, "Zurich": 1, "Montreal": -5, "Singapore": 8, "Istanbul": 3,
               "Buenos Aires": -3, "Mexico City": -6, "Cape Town": 2, "San Francisco": -8,
               "New York": -5, "Hong Kong": 8, "Kyoto": 9, "Amsterdam": 1, "Stockholm": 1}
CONDITIONS = ("sunny", "partly cloudy", "cloudy", "light rain", "heavy rain", "fog", "snow",
              "thunderstorms", "windy", "clear skies")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

FIRST_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
               "judy", "mallory", "nina", "oscar", "peggy", "rahul", "sofia", "tariq", "wei",
               "yuki", "zoe")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
EVENT_TITLES = ("Team standup", "Dentist appointment", "Lunch with Sam", "Project review",
                "Yoga class", "Sprint planning", "Call with the bank", "Birthday dinner",
                "Code review", "Quarterly planning", "Doctor visit", "Piano lesson", "Book club",
                "Interview with Priya", "Release retro", "Parent-teacher meeting", "Gym session")
EMAIL_SUBJECTS = ("Meeting notes", "Quick question", "Release plan", "Invoice for March",
                  "Weekend plans", "Build failure", "Lunch on Friday", "Updated schedule",
                  "Welcome aboard", "Design review", "Travel details", "Thank you")
EMAIL_BODIES = ("The build is fixed now.", "Can we move the meeting to Friday?",
                "Thanks for your help today.", "Here are the notes from the call.",
                "I will be out of office on Monday.", "The release is scheduled for next week.",
                "Please review the draft when you have time.", "Dinner is at 7 pm.",
                "The tests pass on main again.", "Let me know if the new time works for you.")
TASKS = ("buy milk", "renew my passport", "call the plumber", "update the README",
         "fix the login bug", "book flights", "water the plants", "review the pull request",
         "pay the rent", "send the invoice", "back up the laptop", "clean the garage",
         "prepare the slides", "call mom", "order printer ink", "cancel the gym membership")
TIMER_LABELS = ("pasta", "tea", "laundry", "break", "pizza", "workout", "eggs", "meeting prep",
                "bread", "nap")
MUSIC = ("Bohemian Rhapsody", "Miles Davis", "lo-fi beats", "Taylor Swift", "jazz for studying",
         "Beethoven's Symphony No. 7", "classic rock", "Daft Punk", "rainy day playlist",
         "Nina Simone", "the Beatles", "ambient piano")
STOCKS = {"AAPL": 190, "MSFT": 420, "GOOGL": 165, "AMZN": 180, "NVDA": 120, "TSLA": 240,
          "IBM": 185, "ORCL": 140, "INTC": 30, "SAP": 200}
DEFINITIONS = {
    "ephemeral": "lasting for a very short time",
    "ubiquitous": "present or found everywhere",
    "idempotent": "giving the same result however many times it is applied",
    "serendipity": "finding something good without looking for it",
    "latency": "the delay between a request and its response",
    "pragmatic": "dealing with things in a practical way",
    "verbose": "using more words than needed",
    "meticulous": "showing great attention to detail",
    "concise": "giving a lot of information in few words",
    "resilient": "able to recover quickly from difficulties",
    "deprecated": "still available but no longer recommended",
    "heuristic": "a practical rule of thumb that is not guaranteed to be optimal",
    "candid": "honest and direct",
    "frugal": "careful not to spend much money",
}
PLACES = ("Central Station", "City Hall", "Riverside Park", "Union Square", "Harbor Bridge",
          "Oak Street 12", "Westfield Mall", "the airport", "the university", "the old town",
          "the stadium", "Lakeside Hospital")
WORDS = ("apple", "banana", "cherry", "python", "kernel", "rocket", "garden", "window",
         "planet", "coffee", "river", "silver", "orange", "summer", "pixel", "tiger")

CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD")
# Fixed illustrative rates in units per US dollar, not live market data.
USD_RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88, "CAD": 1.36}

LANGUAGES = ("Spanish", "French", "German", "Italian", "Portuguese")
TRANSLATIONS = {
    "good morning": ("buenos días", "bonjour", "guten Morgen", "buongiorno", "bom dia"),
    "thank you very much": ("muchas gracias", "merci beaucoup", "vielen Dank", "grazie mille",
                            "muito obrigado"),
    "where is the train station": ("¿dónde está la estación de tren?", "où est la gare ?",
                                   "wo ist der Bahnhof?", "dov'è la stazione dei treni?",
                                   "onde fica a estação de trem?"),
    "see you tomorrow": ("hasta mañana", "à demain", "bis morgen", "a domani", "até amanhã"),
    "the meeting is at noon": ("la reunión es al mediodía", "la réunion est à midi",
                               "das Treffen ist um zwölf Uhr", "la riunione è a mezzogiorno",
                               "a reunião é ao meio-dia"),
    "good night": ("buenas noches", "bonne nuit", "gute Nacht", "buonanotte", "boa noite"),
    "how are you": ("¿cómo estás?", "comment ça va ?", "wie geht es dir?", "come stai?",
                    "como você está?"),
    "happy birthday": ("feliz cumpleaños", "joyeux anniversaire", "alles Gute zum Geburtstag",
                       "buon compleanno", "feliz aniversário"),
    "the coffee is hot": ("el café está caliente", "le café est chaud", "der Kaffee ist heiß",
                          "il caffè è caldo", "o café está quente"),
}

# Units of convert_units: (dimension, factor to the base unit). Temperatures convert by formula.
UNITS = {
    "kilometers": ("length", 1000.0), "meters": ("length", 1.0), "miles": ("length", 1609.344),
    "feet": ("length", 0.3048), "kilograms": ("mass", 1.0), "grams": ("mass", 0.001),
    "pounds": ("mass", 0.45359237), "ounces": ("mass", 0.028349523125),
    "celsius": ("temperature", 0.0), "fahrenheit": ("temperature", 0.0),
}

DIRECTORIES = ("src", "src/app", "src/utils", "lib", "app", "tests", "scripts", "docs", "config",
               "tools", "api", "web", "data", "examples")
STEMS = ("main", "utils", "config", "server", "models", "parser", "cli", "helpers", "db", "api",
         "tasks", "auth", "cache", "views", "routes", "settings", "client", "report", "billing",
         "search")
FUNCTIONS = ("parse_args", "load_config", "connect", "format_date", "slugify", "retry",
             "read_rows", "send_message", "compute_total", "validate_email", "clean_text",
             "merge_dicts", "chunk", "normalize", "fetch_user", "render_page")
SEARCH_PATTERNS = ("TODO", "FIXME", "def main", "import os", "load_config", "print(",
                   "class User", "raise ValueError", "logger", "async def", "requests.get",
                   "open(", "def test_", "return None", "sys.exit", "HACK", "api_key", "timeout")
GLOBS = ("*.py", "*.md", "test_*.py", "*.json", "*.sh", "*.csv", "*.toml", "*.txt", "*.yaml")
PACKAGES = {"requests": "2.32.3", "numpy": "2.1.1", "rich": "13.8.1", "click": "8.1.7",
            "pyyaml": "6.0.2", "pytest": "8.3.3", "httpx": "0.27.2", "pandas": "2.2.3",
            "flask": "3.0.3", "tqdm": "4.66.5", "black": "24.8.0", "attrs": "24.2.0"}
BRANCHES = ("main", "dev", "feature/login", "fix/parser-crash", "release/1.4", "docs/readme")
COMMIT_MESSAGES = ("Fix off-by-one error in pagination", "Add retry to the HTTP client",
                   "Update README", "Refactor the config loader", "Add tests for slugify",
                   "Bump version to 1.4.0", "Remove unused imports", "Handle empty input in parser",
                   "Speed up the search index", "Log failed logins")


def _date(rng: Rng) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _time(rng: Rng) -> str:
    return f"{rng.randint(7, 20):02d}:{rng.choice((0, 15, 30, 45)):02d}"


def _email(rng: Rng) -> str:
    return f"{rng.choice(FIRST_NAMES)}@{rng.choice(EMAIL_DOMAINS)}"


def _emails(rng: Rng) -> list[str]:
    addresses = rng.sample(FIRST_NAMES, rng.choice((1, 1, 1, 2, 2, 3)))
    return [f"{name}@{rng.choice(EMAIL_DOMAINS)}" for name in addresses]


def _directory(rng: Rng) -> str:
    return rng.choice(DIRECTORIES)


def _python_path(rng: Rng) -> str:
    directory = rng.choice(DIRECTORIES)
    stem = rng.choice(STEMS)
    return f"tests/test_{stem}.py" if directory == "tests" else f"{directory}/{stem}.py"


def _file_path(rng: Rng) -> str:
    stem = rng.choice(STEMS)
    choices = (
        _python_path(rng), _python_path(rng), _python_path(rng), "README.md", f"docs/{stem}.md",
        "notes.txt", f"data/{stem}.csv", f"config/{stem}.json", "pyproject.toml",
        f"scripts/{stem}.sh", "requirements.txt", f"{stem}.py",
    )
    return rng.choice(choices)


def _test_target(rng: Rng) -> str:
    return rng.choice(("tests", f"tests/test_{rng.choice(STEMS)}.py"))


def _title_of(stem: str) -> str:
    return stem.replace("_", " ").capitalize()


def file_content(path: str, rng: Rng) -> tuple[str, str]:
    """Return short, plausible text for a file and a phrase that describes it."""
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0].removeprefix("test_")
    extension = path.rsplit(".", 1)[-1] if "." in path else ""
    function = rng.choice(FUNCTIONS)

    if path.endswith("requirements.txt"):
        names = rng.sample(sorted(PACKAGES), 2)
        text = "".join(f"{name}=={PACKAGES[name]}\n" for name in names)
        return text, f"it pins two packages, {names[0]} and {names[1]}"

    if path.startswith("tests/") and extension == "py":
        text = (f"from {stem} import {function}\n\n\ndef test_{function}():\n"
                f"    assert {function}([]) == []\n")
        return text, f"it has one test, `test_{function}`"

    if extension == "py":
        bodies = (
            (f"def {function}(items):\n    return [item for item in items if item]\n",
             f"it defines `{function}(items)`, which drops empty items"),
            (f"import json\n\n\ndef {function}(path):\n    with open(path) as f:\n"
             f"        return json.load(f)\n", f"it defines `{function}(path)`, which loads JSON"),
            (f"def {function}(a, b):\n    return a + b\n",
             f"it defines `{function}(a, b)`, which returns a + b"),
            (f"class {_title_of(stem).replace(' ', '')}:\n    def __init__(self, name):\n"
             f"        self.name = name\n",
             f"it defines a class `{_title_of(stem).replace(' ', '')}` with a `name` attribute"),
        )
        return rng.choice(bodies)

    if extension == "md":
        title = "Project" if stem == "README" else _title_of(stem)
        text = f"# {title}\n\nRun `make test` before you push.\n"
        return text, f"it is a Markdown page titled \"{title}\" that says to run `make test`"

    if extension == "csv":
        names = rng.sample(FIRST_NAMES, 2)
        scores = rng.randint(50, 99), rng.randint(50, 99)
        text = f"id,name,score\n1,{names[0]},{scores[0]}\n2,{names[1]},{scores[1]}\n"
        return text, "it is a CSV file with the columns id, name and score and 2 rows"

    if extension == "json":
        debug = rng.choice((True, False))
        text = _json({"name": stem, "version": "1.2.0", "debug": debug}) + "\n"
        return text, f"it sets name to \"{stem}\", version to 1.2.0 and debug to {_json(debug)}"

    if extension == "toml":
        return (f"[project]\nname = \"{stem}\"\nversion = \"0.1.0\"\n",
                f"it declares the project \"{stem}\", version 0.1.0")

    if extension == "sh":
        command = rng.choice(("pytest -q", "python -m build", "ruff check .", "make clean"))
        return f"#!/bin/sh\nset -e\n{command}\n", f"it is a shell script that runs `{command}`"
    note = f"{rng.choice(TASKS).capitalize()} by Friday."
    return note + "\n", f"it contains one note: \"{note}\""


def _file_listing(path: str, rng: Rng) -> list[str]:
    names = {f"{stem}.py" for stem in rng.sample(STEMS, rng.randint(1, 4))}
    if path in (".", ""):
        names = {"README.md", "pyproject.toml", "src/", "tests/"} | set(rng.sample(
            ("docs/", "scripts/", "notes.txt", ".gitignore", "Makefile"), 2))
    elif path == "tests":
        names = {f"test_{stem}.py" for stem in rng.sample(STEMS, rng.randint(1, 4))}
    elif path == "docs":
        names = {f"{stem}.md" for stem in rng.sample(STEMS, rng.randint(1, 3))} | {"index.md"}
    elif path == "data":
        names = {f"{stem}.csv" for stem in rng.sample(STEMS, rng.randint(1, 3))}
    elif path == "scripts":
        names = {f"{stem}.sh" for stem in rng.sample(STEMS, rng.randint(1, 3))}
    elif rng.random() < 0.3:
        names.add(rng.choice(("__init__.py", "templates/", "static/")))
    return sorted(names)


# -- run_python: snippets whose output is computed by running them ---------------------------


def _python_snippet(rng: Rng) -> str:
    a, b, n = rng.randint(2, 99), rng.randint(2, 99), rng.randint(3, 20)
    word = rng.choice(WORDS)
    numbers = ", ".join(str(rng.randint(1, 99)) for _ in range(rng.randint(3, 6)))
    snippets = (
        f"print({a} * {b})",
        f"print(sum(range({n})))",
        f"print(2 ** {n})",
        f"import math\nprint(math.factorial({min(n, 12)}))",
        f"print(len('{word}'))",
        f"print('{word}'.upper())",
        f"print('{word}'[::-1])",
        f"print(sorted([{numbers}]))",
        f"print(max([{numbers}]), min([{numbers}]))",
        f"for i in range({min(n, 5)}):\n    print(i * i)",
        f"def f(x):\n    return x * {a} + {b}\n\nprint(f({n}))",
        f"import statistics\nprint(round(statistics.mean([{numbers}]), 2))",
        f"print(divmod({a * b}, {n}))",
        f"print([x for x in range({n}) if x % 3 == 0])",
        f"print({a} / 0)",
        f"items = [{numbers}]\nprint(items[{10 + n}])",
        f"import json\nprint(json.dumps({{'name': '{word}', 'count': {n}}}))",
        f"print('{word}'.count('{word[1]}'))",
        f"print(int('{word}'))",
        f"text = '{word} {rng.choice(WORDS)}'\nprint(text.title())",
    )
    return rng.choice(snippets)


_PYTHON_CACHE: dict[str, tuple[str, str, int]] = {}


def execute_snippet(code: str) -> tuple[str, str, int]:
    """Run one of the generated snippets here and return (stdout, stderr, exit_code).

    Only the fixed snippet shapes of `_python_snippet` with generated numbers and words reach
    this function, never text from outside. The traceback mimics `python -c`.
    """
    if code in _PYTHON_CACHE:
        return _PYTHON_CACHE[code]
    stdout = io.StringIO()
    stderr, exit_code = "", 0
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
    except Exception as error:  # noqa: BLE001 - the snippets fail on purpose
        frames = [frame for frame in traceback.extract_tb(error.__traceback__)
                  if frame.filename == "<string>"]
        line = frames[-1].lineno if frames else 1
        stderr = (f"Traceback (most recent call last):\n  File \"<string>\", line {line}, in "
                  f"<module>\n{type(error).__name__}: {error}\n")
        exit_code = 1
    _PYTHON_CACHE[code] = (stdout.getvalue(), stderr, exit_code)
    return _PYTHON_CACHE[code]


def _process_result(stdout: str, stderr: str = "", exit_code: int = 0) -> str:
    """Format a process result as ToolBox's run_python, run_shell and git_status do."""
    return _json({"exit_code": exit_code, "stdout": stdout, "stderr": stderr})


def _respond_run_python(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    stdout, stderr, exit_code = execute_snippet(args["code"])
    result = _process_result(stdout, stderr, exit_code)
    if exit_code:
        error_line = stderr.strip().splitlines()[-1]
        name, _, message = error_line.partition(": ")
        return result, rng.choice((
            f"The code failed with {name}: {message}.",
            f"It raised an error: `{error_line}`.",
            f"Running it ends in a {name} ({message}).",
        ))
    output = stdout.strip()
    if "\n" in output:
        return result, rng.choice((f"The code printed:\n{output}", f"Output:\n{output}"))
    return result, rng.choice((f"It prints {output}.", f"The output is `{output}`.",
                               f"The result is {output}."))


# -- run_shell: commands and simulated output ------------------------------------------------


def _shell_command(rng: Rng) -> str:
    directory, path = _directory(rng), _file_path(rng)
    commands = (
        f"ls {directory}", "pwd", f"echo {rng.choice(WORDS)} {rng.choice(WORDS)}",
        f"wc -l {path}", "python3 --version", f"du -sh {directory}",
        f"grep -rn {rng.choice(('TODO', 'FIXME', 'import'))} {directory}", "date +%F", "whoami",
        "uname -sr", f"find {directory} -name '*.py' | wc -l", "git branch --show-current",
        f"mkdir -p {directory}/{rng.choice(STEMS)}", f"head -n 3 {path}", f"cat {path}",
        "df -h .", "nproc",
    )
    return rng.choice(commands)


def _shell_output(command: str, rng: Rng) -> tuple[str, str]:
    """Return (stdout, answer) for a command made by `_shell_command`."""
    words = command.split()
    program, last = words[0], words[-1]

    if program == "ls":
        names = _file_listing(last, rng)
        return "\n".join(names) + "\n", f"`{last}` contains {text_of(names)}."

    if program == "pwd":
        where = f"/home/dev/{rng.choice(('project', 'app', 'codeling', 'website'))}"
        return where + "\n", f"The current directory is {where}."

    if program == "echo":
        text = command[5:]
        return text + "\n", f"It printed `{text}`."

    if program == "wc":
        count = rng.randint(3, 400)
        return f"{count} {last}\n", f"{last} has {count} lines."

    if program == "python3":
        version = f"Python 3.{rng.choice((10, 11, 12))}.{rng.randint(1, 9)}"
        return version + "\n", f"The installed version is {version}."

    if program == "du":
        size = f"{rng.randint(1, 90)}{rng.choice(('K', 'M'))}"
        return f"{size}\t{last}\n", f"{last} takes up {size}."

    if program == "grep":
        count = rng.randint(0, 3)
        lines = [f"{last}/{rng.choice(STEMS)}.py:{rng.randint(1, 200)}:# {words[2]} "
                 f"{rng.choice(TASKS)}" for _ in range(count)]
        if not lines:
            return "", f"No lines under {last} contain {words[2]}."
        return "\n".join(lines) + "\n", f"Found {count} matching line(s):\n" + "\n".join(lines)

    if program == "date":
        today = _date(rng)
        return today + "\n", f"Today is {today}."

    if program == "whoami":
        return "dev\n", "You are logged in as `dev`."

    if program == "uname":
        kernel = f"Linux 6.{rng.randint(1, 11)}.0-{rng.randint(10, 60)}-generic"
        return kernel + "\n", f"This machine runs {kernel}."

    if program == "find":
        count = rng.randint(0, 40)
        return f"{count}\n", f"There are {count} Python files under {words[1]}."

    if program == "git":
        branch = rng.choice(BRANCHES)
        return branch + "\n", f"You are on the branch `{branch}`."

    if program == "mkdir":
        return "", f"Created the directory {last}."

    if program in ("head", "cat"):
        text, summary = file_content(last, rng)
        if program == "head":
            text = "".join(text.splitlines(keepends=True)[:3])
            return text, f"The first lines of {last} are:\n{text.rstrip()}"
        return text, f"In {last}, {summary}."

    if program == "df":
        size, used = rng.randint(50, 500), rng.randint(10, 40)
        free = size - used
        return (f"Filesystem Size Used Avail Use% Mounted on\n/dev/sda1 {size}G {used}G "
                f"{free}G {round(100 * used / size)}% /\n",
                f"The disk has {free}G free out of {size}G.")
    cores = rng.choice((2, 4, 8, 16))
    return f"{cores}\n", f"This machine has {cores} CPU cores."


def _respond_run_shell(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    stdout, answer = _shell_output(args["command"], rng)
    return _process_result(stdout), answer


# -- the other developer tools ---------------------------------------------------------------


def _not_found(path: str) -> str:
    return _json({"error": f"'{path}' does not exist; use list_files to see what does"})


def _respond_read_file(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    path = args["path"]
    if rng.random() < 0.1:
        return _not_found(path), rng.choice((
            f"{path} does not exist. Shall I list the files to find the right name?",
            f"There is no file called {path}.",
        ))
    text, summary = file_content(path, rng)
    return text, rng.choice((f"In {path}, {summary}.", f"Here is {path}: {summary}."))


def _respond_list_files(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    path = args.get("path", ".")
    names = _file_listing(path, rng)
    where = "The working directory" if path == "." else f"`{path}`"
    return _json(names), rng.choice((f"{where} contains {text_of(names)}.",
                                     f"{where} has {len(names)} entries: {', '.join(names)}."))


def _respond_search_code(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    pattern, root = args["pattern"], args.get("path", ".")
    prefix = "" if root == "." else root.rstrip("/") + "/"
    matches = []
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        path = prefix + f"{rng.choice(STEMS)}.py" if prefix else _python_path(rng)
        tail = rng.choice(("# check", "x", "(path)", ""))
        matches.append({"path": path, "line": rng.randint(1, 300),
                        "text": f"    {pattern} {tail}".rstrip()})
    result = _json({"matches": matches, "truncated": False})
    if not matches:
        return result, f"No matches for `{pattern}`."
    places = [f"{match['path']} line {match['line']}" for match in matches]
    return result, f"`{pattern}` appears in {text_of(places)}."


def _respond_write_file(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    size = len(args["content"].encode("utf-8"))
    result = _json({"path": args["path"], "bytes_written": size})
    return result, rng.choice((f"Done: wrote {size} bytes to {args['path']}.",
                               f"Saved {args['path']} ({size} bytes)."))


def _respond_git_status(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    if rng.random() < 0.2:
        return _process_result(""), "The working tree is clean: nothing to commit."
    modified = sorted({_python_path(rng) for _ in range(rng.randint(1, 3))})
    untracked = sorted({rng.choice(("notes.txt", "scratch.py", "data/out.csv"))
                        for _ in range(rng.randint(0, 1))})
    stdout = "".join(f" M {path}\n" for path in modified) + "".join(f"?? {path}\n"
                                                                     for path in untracked)
    answer = f"Modified: {text_of(modified)}."
    if untracked:
        answer += f" Untracked: {text_of(untracked)}."
    return _process_result(stdout), answer


def _respond_git_diff(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    path = args.get("path") or _python_path(rng)
    line = rng.randint(3, 120)
    old = rng.choice(("return a+b", "timeout = 5", "if x == None:", "print('debug')"))
    new = {"return a+b": "return a + b", "timeout = 5": "timeout = 30",
           "if x == None:": "if x is None:", "print('debug')": "logger.debug('debug')"}[old]
    diff = (f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n"
            f"@@ -{line},1 +{line},1 @@\n-    {old}\n+    {new}\n")
    return diff, f"One line changed in {path}: `{old}` became `{new}`."


def _respond_git_log(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    count = args.get("max_count", 3)
    messages = [rng.choice(COMMIT_MESSAGES) for _ in range(count)]
    lines = [f"{rng.getrandbits(28):07x} {message}" for message in messages]
    scope = f" touching {args['path']}" if "path" in args else ""
    return "\n".join(lines), f"The last {count} commits{scope}:\n" + "\n".join(lines)


def _respond_run_tests(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    target = args.get("path", "tests")
    passed, failed = rng.randint(1, 60), rng.choice((0, 0, 0, 1, 2))
    seconds = round(rng.uniform(0.1, 9.0), 2)
    lines = []
    if args.get("verbose"):
        test_file = target if target.endswith(".py") else f"tests/test_{rng.choice(STEMS)}.py"
        lines = [f"{test_file}::test_{rng.choice(FUNCTIONS)} PASSED"]
    failing = f"tests/test_{rng.choice(STEMS)}.py::test_{rng.choice(FUNCTIONS)}"
    if failed:
        lines.append(f"FAILED {failing} - AssertionError")
        lines.append(f"{failed} failed, {passed} passed in {seconds}s")
        answer = f"{failed} test(s) failed, including {failing}; {passed} passed."
    else:
        lines.append(f"{passed} passed in {seconds}s")
        answer = f"All {passed} tests in {target} passed."
    return "\n".join(lines), answer


def _respond_pip_install(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    package = args["package"]
    version = args.get("version", PACKAGES.get(package, "1.0.0"))
    return (f"Successfully installed {package}-{version}",
            f"Installed {package} {version}.")


def _respond_lint_file(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    path = args["path"]
    if rng.random() < 0.4:
        return "All checks passed!", f"{path} has no lint errors."
    line = rng.randint(1, 80)
    name = rng.choice(("os", "sys", "json", "re"))
    return (f"{path}:{line}:1: F401 `{name}` imported but unused\nFound 1 error.",
            f"One problem: line {line} of {path} imports `{name}` without using it.")


def _respond_find_files(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    pattern, root = args["pattern"], args.get("path", ".")
    suffix = pattern.replace("*", "")
    prefix = "" if root == "." else root.rstrip("/") + "/"
    stems = rng.sample(STEMS, rng.randint(0, 3))
    paths = [f"{prefix}{'test_' if pattern.startswith('test_') else ''}{stem}"
             f"{suffix.removeprefix('test_')}" for stem in sorted(stems)]
    if not paths:
        return _json([]), f"No files match {pattern}."
    return _json(paths), f"Found {len(paths)} file(s): {text_of(paths)}."


# -- everyday tools --------------------------------------------------------------------------


def _expression(rng: Rng) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 20)
    return rng.choice((f"{a} * {b}", f"{a} + {b} * {c}", f"({a} + {b}) / {c}", f"{a} - {b}",
                       f"{b} ** 2", f"{a} % {c}", f"{a} / {c}", f"{a} * {b} - {c}"))


def _respond_calculator(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    expression = args["expression"]
    # Only the arithmetic of _expression reaches eval: digits, spaces and + - * / % ( ).
    value = _number(eval(expression, {"__builtins__": {}}))  # noqa: S307
    return _json({"result": value}), rng.choice((f"{expression} = {value}.",
                                                 f"The result is {value}."))


def _convert_unit(value: float, source: str, target: str) -> float:
    if UNITS[source][0] == "temperature":
        celsius = value if source == "celsius" else (value - 32) * 5 / 9
        return celsius if target == "celsius" else celsius * 9 / 5 + 32
    return value * UNITS[source][1] / UNITS[target][1]


def _joint_units(values: dict[str, Any], rng: Rng) -> None:
    dimension = UNITS[values["from_unit"]][0]
    values["to_unit"] = rng.choice([unit for unit, (other, _) in UNITS.items()
                                    if other == dimension and unit != values["from_unit"]])


def _respond_convert_units(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    value = _number(_convert_unit(args["value"], args["from_unit"], args["to_unit"]))
    result = _json({"value": value, "unit": args["to_unit"]})
    return result, rng.choice((
        f"{args['value']} {args['from_unit']} is about {value} {args['to_unit']}.",
        f"That's {value} {args['to_unit']}.",
    ))


def _conditions(celsius: int, rng: Rng) -> str:
    """Pick weather conditions that fit the temperature: snow only at or below 1 °C."""
    if celsius <= 1:
        return rng.choice(("snow", "clear skies", "cloudy", "fog"))
    return rng.choice([condition for condition in CONDITIONS if condition != "snow"])


def _respond_weather(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    units = args.get("units", "celsius")
    celsius = rng.randint(-10, 35)
    temperature = celsius if units == "celsius" else round(celsius * 9 / 5 + 32)
    symbol = "°C" if units == "celsius" else "°F"
    conditions = _conditions(celsius, rng)
    result = _json({"city": args["city"], "temperature": temperature, "units": units,
                    "conditions": conditions, "humidity": rng.randint(20, 95)})
    return result, rng.choice((
        f"It's {temperature}{symbol} with {conditions} in {args['city']} right now.",
        f"{args['city']}: {conditions}, {temperature}{symbol}.",
    ))


def _respond_forecast(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    start = rng.randrange(7)
    days = []
    for offset in range(args["days"]):
        high = rng.randint(0, 32)
        days.append({"day": WEEKDAYS[(start + offset) % 7], "high": high,
                     "low": high - rng.randint(3, 10), "conditions": _conditions(high, rng)})
    summary = "; ".join(f"{day['day']} {day['conditions']}, {day['low']} to {day['high']}°C"
                        for day in days)
    return _json({"city": args["city"], "days": days}), f"Forecast for {args['city']}: {summary}."


def _respond_create_event(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    result = _json({"event_id": f"evt_{rng.randint(1000, 9999)}", "status": "created"})
    when = args["date"]
    if args.get("all_day"):
        when += " (all day)"
    elif "time" in args:
        when += f" at {args['time']}"
    if "duration_minutes" in args:
        when += f" for {args['duration_minutes']} minutes"
    return result, rng.choice((f"Done: \"{args['title']}\" is on your calendar for {when}.",
                               f"I added \"{args['title']}\" on {when}."))


def _respond_list_events(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    events = sorted(({"time": _time(rng), "title": rng.choice(EVENT_TITLES)}
                     for _ in range(rng.choice((0, 1, 2, 3)))), key=lambda event: event["time"])
    result = _json({"date": args["date"], "events": events})
    if not events:
        return result, f"Your calendar is empty on {args['date']}."
    listed = [f"{event['title']} at {event['time']}" for event in events]
    return result, f"On {args['date']} you have {text_of(listed)}."


def _respond_set_timer(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    result = _json({"timer_id": rng.randint(1, 99), "minutes": args["minutes"],
                    "status": "running"})
    label = f" for the {args['label']}" if "label" in args else ""
    return result, f"Your {args['minutes']}-minute timer{label} is running."


def _respond_set_reminder(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    result = _json({"reminder_id": rng.randint(100, 999), "status": "scheduled"})
    return result, f"I'll remind you to {args['text']} on {args['date']} at {args['time']}."


def _joint_currencies(values: dict[str, Any], rng: Rng) -> None:
    values["to_currency"] = rng.choice([code for code in CURRENCIES
                                        if code != values["from_currency"]])


def _respond_currency(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    rate = USD_RATES[args["to_currency"]] / USD_RATES[args["from_currency"]]
    converted = _number(args["amount"] * rate)
    result = _json({"amount": converted, "currency": args["to_currency"], "rate": round(rate, 4)})
    return result, rng.choice((
        f"{args['amount']} {args['from_currency']} is about {converted} {args['to_currency']}.",
        f"That comes to {converted} {args['to_currency']}.",
    ))


def _respond_translate(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    translated = TRANSLATIONS[args["text"]][LANGUAGES.index(args["target_language"])]
    result = _json({"translation": translated, "language": args["target_language"]})
    return result, rng.choice((f"In {args['target_language']}: \"{translated}\".",
                               f"\"{args['text']}\" is \"{translated}\" in "
                               f"{args['target_language']}."))


def _respond_send_email(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    result = _json({"status": "sent", "message_id": f"msg_{rng.getrandbits(24):06x}"})
    return result, f"Sent \"{args['subject']}\" to {text_of(args['to'])}."


def _respond_get_time(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    offset = UTC_OFFSETS[args["city"]]
    local = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    hours, minutes = int(abs(offset)), int(abs(offset) % 1 * 60)
    utc = f"{'+' if offset >= 0 else '-'}{hours:02d}:{minutes:02d}"
    result = _json({"city": args["city"], "time": local, "utc_offset": utc})
    return result, f"It's {local} in {args['city']} (UTC{utc})."


def _respond_define_word(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    meaning = DEFINITIONS[args["word"]]
    return (_json({"word": args["word"], "definition": meaning}),
            f"\"{args['word'].capitalize()}\" means {meaning}.")


def _respond_stock(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    price = round(STOCKS[args["symbol"]] * rng.uniform(0.9, 1.1), 2)
    change = round(rng.uniform(-3, 3), 2)
    result = _json({"symbol": args["symbol"], "price": price, "currency": "USD",
                    "change_percent": change})
    return result, f"{args['symbol']} is at {price} USD ({change:+}% today)."


def _respond_add_todo(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    result = _json({"id": rng.randint(1, 500), "status": "added"})
    details = []
    if "due_date" in args:
        details.append(f"due {args['due_date']}")
    if "priority" in args:
        details.append(f"{args['priority']} priority")
    suffix = f" ({', '.join(details)})" if details else ""
    return result, f"Added \"{args['task']}\" to your to-do list{suffix}."


def _joint_route(values: dict[str, Any], rng: Rng) -> None:
    values["destination"] = rng.choice([place for place in PLACES if place != values["origin"]])


def _respond_directions(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    mode = args.get("mode", "driving")
    distance = rng.randint(1, 40)
    speed = {"driving": 80, "transit": 60, "cycling": 18, "walking": 5}[mode]
    minutes = max(5, round(distance / speed * 60))
    result = _json({"distance_km": distance, "duration_minutes": minutes, "mode": mode})
    hours, rest = divmod(minutes, 60)
    duration = f"{hours} h {rest} min" if hours else f"{rest} min"
    how = {"driving": "by car", "walking": "on foot", "cycling": "by bike",
           "transit": "by public transit"}[mode]
    return result, (f"From {args['origin']} to {args['destination']} is {distance} km, about "
                    f"{duration} {how}.")


def _respond_play_music(args: Mapping[str, Any], rng: Rng) -> tuple[str, str]:
    shuffle = bool(args.get("shuffle", False))
    result = _json({"status": "playing", "query": args["query"], "shuffle": shuffle})
    return result, f"Now playing {args['query']}{' on shuffle' if shuffle else ''}."


# -- the library -----------------------------------------------------------------------------


# Training phrasings as choice grammars (see `Template`), added after each tool's fixed ones.
# `check_library` rejects an expansion that equals an evaluation phrasing (see `phrasing_key`).
_ASK = "[can you |could you |would you |can you please |could you please ]"
_REQUEST_GRAMMAR: dict[str, tuple[str | tuple[str, dict], ...]] = {
    "run_python": (
        "[please |]run [this|the following|my] [Python |][code|snippet|script][ for "
        "me|]:\n[```python\n{code}\n```|{code}|```\n{code}\n```]",
        _ASK + "[run|execute] [this|my] [Python |][code|snippet][ and tell me what it prints| "
               "and show me the output|]?\n[```python\n{code}\n```|{code}]",
        "What [is the output of|do I get from|happens when I run] this[ Python code| "
        "script|]?\n[```python\n{code}\n```|{code}]",
        "[```python\n{code}\n```|{code}]\n[Run this.|Run it, please.|What does it print?|Can you "
        "execute that?|What's the output?]",
        "I'd like to see what this [snippet|code] [prints|outputs].\n[```python\n{code}\n```|"
        "{code}]",
        "Here's my [snippet|script]. What does it print when [I run it|you execute it]?\n"
        "[```python\n{code}\n```|{code}]",
        "Does this [code|snippet] [run without errors|work|crash]?\n[```python\n{code}\n```|"
        "{code}]",
        "[Evaluate|Test-run|Execute] [this|the snippet below][, please|]:\n[```python\n{code}\n"
        "```|{code}]",
        "[Output of|Result of] this[ snippet| code|][, please|]:\n[```python\n{code}\n```|"
        "{code}]",
    ),
    "run_shell": (
        "[please |]run [`{command}`|{command}|the command `{command}`|this command: {command}][ "
        "for me|][ in the shell| in bash|].",
        _ASK + "[run|execute] `{command}`[ for me|][ and tell me what it says| and show me the "
               "output|]?",
        "What does `{command}` [print|output|return|say][ here| in this directory|]?",
        "[Execute|Launch] `{command}`[ in bash| in a shell| on the command line|][, please|].",
        "`{command}`[ please|, what does it give?| — run that, please.]",
        "I want to see what `{command}` [prints|returns][ here| on this machine|].",
        "I'm [checking|debugging] [the setup|something]. [Run|Execute] `{command}`[ and show me "
        "the result|].",
        "What happens [if|when] I run `{command}`[ here| on this box|]?",
        "[Shell|Bash|Terminal][:| command:] `{command}`",
        "[Invoke|Go ahead and run|Kick off] `{command}`[, please|][ and report back|].",
    ),
    "read_file": (
        "[please |]show me [the contents of |what's in |][{path}|`{path}`|the file {path}][ "
        "please|].",
        _ASK + "[read|open|print|cat|show me] [{path}|`{path}`|the file {path}][ for me|]?",
        "What does [{path}|`{path}`] [say|contain|look like][ right now|]?",
        "I'd like to [read|look at|see the contents of] [{path}|`{path}`].",
        "[Read|Open|Print|Cat] [{path}|`{path}`|the file {path}][ for me|][ please|].",
        "I need to [check|review|go through] [{path}|`{path}`]. [Show|Print] it[ for me|].",
        "Can I [see|have a look at] [{path}|`{path}`][, please|]?",
        "[Contents of|Dump] [{path}|`{path}`][, please|].",
        "I'm editing [{path}|`{path}`][ next|]. What's in it[ at the moment| now|]?",
        "[Pull up|Bring up|Fetch|Load] [{path}|`{path}`|the file {path}][ for me|].",
    ),
    "list_files": (
        "[please |]list [the |all the |all |]files [in|under|inside] [{path}|`{path}`|the {path} "
        "folder|the {path} directory].",
        _ASK + "list [the contents of|everything in|the files in] [{path}|the {path} folder|the "
               "{path} directory]?",
        "What's [inside|in] the {path} [folder|directory][ right now|]?",
        "Show me [the files|the contents|everything] [of|in] [{path}|`{path}`][ please|].",
        "[List|Show me] [the files in |everything in |the contents of |]the "
        "[current|project|top-level] [folder|directory].",
        "What files [are there|do we have|do I have][ in this folder| in the project|]?",
        "I need [a list of|to see] the files [in|under] [{path}|`{path}`].",
        "[Is there anything|Are there any files] [in|inside] [{path}|the {path} folder][ yet|]?",
        "[Files in|Files under] [{path}|`{path}`][, please|]",
        "[I'm new to this project.|I just cloned this repo.] What [files are|is] in [{path}|the "
        "{path} folder]?",
        "[Browse|Look through|Peek into] [the current folder|this directory|{path}][ for me|].",
    ),
    "search_code": (
        "[please |]search [the code|the codebase|the project|the repo|{path}] for `{pattern}`.",
        "[Grep|Search] for [`{pattern}`|{pattern}] [in {path}|under {path}|in the code|across "
        "the project|].",
        "Where [is|does] `{pattern}` [used|appear|show up][ in {path}| in the code|]?",
        _ASK + "[look for|find|grep for] `{pattern}` [in {path}|in the code|in the project|]?",
        "Show me [every line|the lines|each line] [with|containing|that has] `{pattern}`[ in "
        "{path}|].",
        "Is `{pattern}` [used|referenced|mentioned] anywhere[ in {path}|]?",
        "[I want|I'd like] to find all [usages|occurrences|uses] of `{pattern}`[ in {path}| "
        "under {path}|].",
        "[Occurrences|Usages|Matches] of `{pattern}`[ in {path}|][, please|]",
        "I'm [refactoring|cleaning up] [the code|{path}]. Where does `{pattern}` "
        "[occur|appear]?",
        "[Scan|Comb through|Hunt through] [the code|the repo|{path}] for `{pattern}`[ please|].",
    ),
    "write_file": (
        "[please |]write [this|the following|these lines] [to|into] "
        "[{path}|`{path}`]:\n{content}",
        "[Create|Save|Write] [{path}|`{path}`|the file {path}] with [this|the following] "
        "[content|text][:|]\n{content}",
        _ASK + "save this as [{path}|`{path}`]?\n{content}",
        "Put the following [text |content |]in [{path}|`{path}`]:\n{content}",
        "{content}\n[Save that to|Write that to|Store this in|Save this as] [{path}|`{path}`][, "
        "please|].",
        "[I need|I want|I'd like] [a|a new] file at [{path}|`{path}`] containing:\n{content}",
        "Would you [overwrite|replace] [{path}|`{path}`] with [this|the text below]?\n{content}",
        "[New file|File] [{path}|`{path}`]:\n{content}",
        "Here's the [new|updated] [file|content]. Store it [in|as] [{path}|`{path}`]:\n{content}",
        "[Dump|Drop|Stick] [this|the following] into [{path}|`{path}`][ for me|]:\n{content}",
    ),
    "git_status": (
        "[What's|What is] the [git |repo |repository |]status[ of the repo| here|]?",
        "[Show|Give] me [the |]git status[ please|].",
        "[Are there|Do I have] any [uncommitted|unstaged|untracked] [changes|files][ in the "
        "repo| here|]?",
        "Which files [are modified|are untracked|are staged|have I touched][ in the repo|]?",
        "Is the [working directory|repo|repository] clean?",
        "Run git status[ for me|].",
        "I'm about to [commit|push|switch branches]. What's [pending|uncommitted|not yet "
        "staged]?",
        "I[ want|'d like] to know what's [changed|modified|staged] in [the repo|this checkout].",
        "[Repo|Working tree|Branch] status[, please|].",
        "How [dirty|clean] is [my|the] [working copy|checkout]?",
        "[List|Report] the [staged and unstaged|untracked|pending] files[ in this checkout|].",
    ),
    "git_diff": (
        "[Show|Give] me the [git |]diff[ for {path}| of my changes|].",
        "What [did I change|have I changed] in [{path}|`{path}`][ so far|]?",
        _ASK + "show me [my|the] [unstaged|uncommitted] changes[ to {path}| in {path}|]?",
        "Diff [{path}|`{path}`][, please|].",
        "How does {path} differ from the last commit?",
        "I'm about to [commit|open a PR|push]. [What changed in|What's different in] "
        "[{path}|`{path}`]?",
        "I [want|need] to review my [edits|modifications|changes][ to {path}| in {path}|].",
        "[Changes|Edits] [in|to] [{path}|`{path}`][?|, please.]",
        "Which lines [have I edited|have I touched][ in {path}| so far|]?",
        "[Compare|Check] [{path}|the working tree|my working copy] against [HEAD|the last "
        "commit][, please|].",
    ),
    "run_tests": (
        "[please |]run [the|all the|all] tests[ now| again|].",
        "Run the [unit |]tests [in|under|for] [{path}|`{path}`][ please|].",
        "Are the tests [passing|green][ in {path}|]?",
        ("Run the tests [in {path} |]with [verbose output|-v|full output].", {"verbose": True}),
        "Run pytest[ on {path}|].",
        _ASK + "run the [test suite|tests][ in {path}|]?",
        "Is [anything|any test] [failing|broken][ in {path}|] right now?",
        "I just [pushed a fix|refactored some code|changed a few files]. [Do the tests still "
        "pass|Is the suite still green][ in {path}|]?",
        ("I want [detailed|verbose|per-test] output from the tests[ in {path}|].",
         {"verbose": True}),
        "[Test|Run the suite on] [{path}|`{path}`][, please|].",
        ("[Kick off|Trigger] a [quiet|non-verbose] test run[ on {path}|].", {"verbose": False}),
    ),
    "pip_install": (
        "[please |]install [the |]{package}[ package|][ for me|].",
        _ASK + "[install|add|pip install] {package}[ for me|]?",
        "Add {package}[ version {version}| {version}|] to the environment.",
        "Set up {package}[ version {version}|][ for me|].",
        "[Could I get|Can I have] {package}[ version {version}|] [installed|set up]?",
        "[I need|This project needs] {package}[ (version {version})| pinned to {version}| at "
        "version {version}|].",
        "`pip install {package}[=={version}|]` [in this venv|into the environment|, thanks]",
        "[My script can't import {package}.|{package} is missing from the environment.] "
        "[Install|Add] it[, version {version}|][ please|].",
        "[Grab|Fetch|Pull in] {package}[ {version}| version {version}|] [from PyPI|with pip].",
    ),
    "find_files": (
        "Find [all |every |the |]{pattern} files[ in {path}| under {path}|].",
        "[Which|What] {pattern} files [are there|do we have|exist][ in {path}|]?",
        "Locate [all |]files [named|like] `{pattern}`[ in {path}| under {path}|].",
        "[List|Show me] every file [that matches|named like] {pattern}[ under {path}|].",
        "Are there any {pattern} files[ in {path}|]?",
        "How many {pattern} files [are there|do we have][ in {path}| under {path}|]?",
        "I [need|want] [a list of|the paths to] all {pattern} files[ in {path}| under {path}|].",
        "[Glob|Files matching] `{pattern}`[ in {path}| under {path}|]",
        "I'm [cleaning up|auditing] the [repo|project]. Where are the {pattern} files[ in "
        "{path}|]?",
        "[Track down|Hunt down|Gather] [every|each] file matching `{pattern}`[ under {path}| in "
        "{path}|].",
    ),
    "calculator": (
        "[What's|What is] {expression}[ exactly|]?",
        "[Calculate|Compute|Work out|Solve] {expression}[ for me|][ please|].",
        _ASK + "[calculate|compute|work out|solve] {expression}?",
        "How much [is {expression}|does {expression} come to|does {expression} make]?",
        "[Quick math|Math question]: {expression}",
        "What do you get [for|from] {expression}?",
        "I'd like to know [the answer to|the value of] {expression}.",
        "I'm [splitting a bill|checking some numbers|doing my budget]. [What's|What is] "
        "{expression}?",
        "{expression} [= ?|=|equals what?]",
        "Do you know what {expression} [is|equals|comes to]?",
        "[Figure out|Crunch|Do the math on] {expression}[ for me|][, please|].",
    ),
    "convert_units": (
        "[please |]convert {value} {from_unit} [to|into] {to_unit}.",
        "How many {to_unit} [is|are|make] {value} {from_unit}?",
        "[What's|What is] {value} {from_unit} [in|as] {to_unit}?",
        _ASK + "convert {value} {from_unit} to {to_unit}?",
        "I [need|want] {value} {from_unit} [in|converted to|expressed in] {to_unit}.",
        "[I'd like to know|I have to figure out] how many {to_unit} [are in|make up] {value} "
        "{from_unit}.",
        "[The spec says|My notes say|The label reads] {value} {from_unit}. Convert that to "
        "{to_unit}[, please|].",
        "{value} {from_unit} [->|=>|into] {to_unit}[, please|]",
        "[Any idea|Do you know] how many {to_unit} {value} {from_unit} [is|comes to]?",
        "[Express|Give me|Show] {value} {from_unit} in {to_unit}[, please|].",
    ),
    "get_weather": (
        "[What's|What is|How's] the weather [in|for|like in] {city}[ today| right now| at the "
        "moment|]?",
        "Is it [raining|sunny|snowing|windy] in {city}[ today|]?",
        "[Tell me|Show me|Check] the [current |]weather in {city}[ in {units}|].",
        "[Weather|Current conditions] in {city}[ in {units}|][, please|].",
        "What temperature is it in {city}[ in {units}|]?",
        "[Do I need|Should I bring] [an umbrella|a jacket|a coat] in {city}[ today|]?",
        "[I'd like|I want] [the|a] weather [report|update] for {city}[ in {units}|].",
        "[Weather|Temp|Conditions] {city}[, {units}|]",
        "I'm [heading to|flying to|visiting] {city}[ today| this afternoon|]. [How's the weather "
        "there|Is it nice out there|What are conditions like there]?",
        "How [hot|cold|warm] is it in {city}[ in {units}|][ right now|]?",
    ),
    "get_forecast": (
        "[What's|What is] the [weather |]forecast for {city} [for|over] the next {days} days?",
        "[Give|Show] me [a|the] {days}-day [weather |]forecast for {city}[ please|].",
        "Will it [rain|snow|be sunny] in {city} [in|over] the next {days} days?",
        "Forecast [for|in] {city}[,| for] {days} days[, please|].",
        "What weather should I expect in {city} [over|during] the next {days} days?",
        "I [need|want] the [weather |]outlook for {city} [for|over] the next {days} days.",
        "[I'll be in|I'm traveling to|I'm visiting] {city} for the next {days} days. [Will it "
        "rain|What weather can I expect|Do I need an umbrella]?",
        "{days}-day [forecast|outlook][,| for] {city}[, please|]",
        "[Pull up|Check|Look up] the [forecast|outlook] [for|in] {city}, next {days} days.",
        "What does the [forecast|outlook] [look like|say] for {city} [over|across] the next "
        "{days} days?",
    ),
    "create_event": (
        "Add [\"{title}\"|{title}] [to my calendar |]on {date} at {time}[ please|].",
        "Schedule [\"{title}\"|{title}] [on|for] {date} at {time}[ for {duration_minutes} "
        "minutes|].",
        "[Make|Create] an event [named|titled] \"{title}\" [on|for] {date}[ at {time}|].",
        ("Mark {date} as [an all-day|a full-day] event: {title}.", {"all_day": True}),
        "Put {title} [in|on] my calendar for {date}[ at {time}|][, {duration_minutes} minutes|].",
        "I need [{title}|\"{title}\"] on my calendar [for|on] {date}[ at {time}|].",
        "[{title}|\"{title}\"] is on {date}[ at {time}|]. [Add it to my calendar|Put it on my "
        "calendar][, please|].",
        ("[{title}|\"{title}\"] takes [all day|the whole day] on {date}. [Add|Schedule] it.",
         {"all_day": True}),
        "[Could you|Can you] [book|reserve] {duration_minutes} minutes [on|for] {date} at {time} "
        "for {title}?",
        "[New event|Calendar][:|,] {title}, {date}[, {time}|][, {duration_minutes} min|]",
    ),
    "list_events": (
        "What's on my [calendar|schedule|agenda] [on|for] {date}?",
        "[Show|List] [me |]my [events|meetings|appointments] [on|for] {date}.",
        "Do I have [anything|any meetings|any appointments] [on|scheduled for] {date}?",
        "What [meetings|events|appointments] do I have [on|for] {date}?",
        "Check my calendar for {date}[, please|].",
        "I need to [know|see] what's [scheduled|booked|lined up] [for|on] {date}.",
        "[I want to book something on {date}.|Someone wants to meet on {date}.] What's already "
        "[scheduled|booked|on my calendar] [that day|then]?",
        "[Agenda|Calendar|Appointments] for {date}[, please|]",
        "How [busy|packed|full] is my [day|calendar] on {date}?",
        "[Pull up|Read out|Go over] my [appointments|commitments|bookings] [for|on] {date}.",
    ),
    "set_timer": (
        "[please |]set a [{minutes}-minute|{minutes} minute] timer[ for the {label}| called "
        "{label}|].",
        "[Set|Start] a timer for {minutes} minutes[ for the {label}|].",
        "Timer[:|,] {minutes} minutes[ for the {label}|][ please|].",
        _ASK + "time {minutes} minutes[ for the {label}|]?",
        "[Alert|Ping|Wake] me in {minutes} minutes[ for the {label}|].",
        "I want [to be told|to know] when {minutes} minutes [are up|have passed].",
        "The {label} [needs|takes] {minutes} minutes. [Time it|Set a timer][, please|].",
        "{minutes} [min|minute] timer[ for the {label}|][, please|]",
        "[Could|Would] you [buzz|beep] me in {minutes} minutes[ for the {label}|]?",
        "[Kick off|Get going|Fire up] a {minutes}-minute timer[ for the {label}|].",
    ),
    "convert_currency": (
        "[please |]convert {amount} {from_currency} [to|into] {to_currency}.",
        "[How much|What] is {amount} {from_currency} in {to_currency}[ today|]?",
        "How many {to_currency} [do I get|would I get] for {amount} {from_currency}?",
        "[Exchange|Change] {amount} {from_currency} [to|into|for] {to_currency}[ please|].",
        _ASK + "convert {amount} {from_currency} to {to_currency}?",
        "[I'd like|I need] to [swap|change] {amount} {from_currency} for {to_currency}.",
        "[The hotel costs|The ticket costs|My bill comes to] {amount} {from_currency}. What's "
        "that [in|worth in] {to_currency}?",
        "{from_currency} [to|into|->] {to_currency}[:|,] {amount}",
        "[What would|How much would] {amount} {from_currency} [buy|get me] in {to_currency}?",
        "What's the [{to_currency} value|value in {to_currency}] of {amount} {from_currency}[ "
        "today| right now|]?",
    ),
    "translate_text": (
        "[please |]translate [\"{text}\"|{text}] [into|to] {target_language}.",
        _ASK + "translate [\"{text}\"|{text}] [into|to] {target_language}?",
        "How [do you|would you|do I] say \"{text}\" in {target_language}?",
        "What's the {target_language} [for|translation of] \"{text}\"?",
        "[In|Into] {target_language}[, please|]: {text}",
        "I need \"{text}\" in {target_language}.",
        "My [friend|colleague|neighbor] speaks {target_language}. How [do I|would I|can I] "
        "[say|write] \"{text}\"?",
        "[Do you know|Any idea] how to [say|write] \"{text}\" in {target_language}?",
        "\"{text}\" [in|->|into] {target_language}[?|]",
        "[I'd like|I need] [a|the] {target_language} [version|rendering] of \"{text}\".",
        "[Render|Rewrite] \"{text}\" in {target_language}[, please|].",
    ),
    "send_email": (
        "[please |]send an email to {to} [with the subject|titled|with subject] \"{subject}\"[ "
        "saying|. Body:|. Text:|:] {body}",
        "Email {to}[:|.] Subject: {subject}. [Body|Message|Text]: {body}",
        "Write an email to {to} about \"{subject}\" [that says|saying]: {body}",
        "[Mail|Message] {to}, subject \"{subject}\", saying: {body}",
        _ASK + "email {to}? Subject \"{subject}\", [text|message]: {body}",
        "I'd like to [send|write] {to} an email [titled|with the subject] \"{subject}\"[. It "
        "should say:|, saying:] {body}",
        "I [have to|need to] update {to}. Send [an email|a note] with subject \"{subject}\" "
        "[saying|that reads]: {body}",
        "To: {to}\nSubject: {subject}\n[Body|Message]: {body}\n[Send it.|Send this.|Please "
        "send.]",
        "Would you [shoot|send] {to} a [quick |]email[ for me|]? Subject \"{subject}\", and it "
        "should say: {body}",
        "[Compose and send|Write up and send] [an email|a message] to {to} titled \"{subject}\" "
        "[with the text|reading]: {body}",
    ),
    "get_time": (
        "What[ time is it| is the time| is the local time|'s the time] in {city}[ right now| "
        "now|]?",
        "[Tell me|Give me|Check] the [current |local |]time in {city}[ please|].",
        "[Current time|Local time|Time] in {city}[?|, please.]",
        "What's the clock [showing|at] in {city}[ now|]?",
        "[Do you know|Any idea] what time it is in {city}[ right now|]?",
        "I [have a call with|want to phone] [a colleague|a client] in {city}. Check the [local "
        "|]time there[, please|].",
        "[{city} time|{city} local time|Local time, {city}][?|]",
        "[I need|I'd like to know] the [current |]time in {city}.",
        "[Look up|Find out] what time it is [in|over in] {city}[ now|].",
    ),
    "add_todo": (
        "[please |]add [\"{task}\"|{task}] to my [to-do|todo|task] list[, due {due_date}|][ with "
        "{priority} priority|].",
        "[Put|Add] {task} on my [to-do|todo] list[ for {due_date}|].",
        "New [task|to-do|todo][:|,] {task}[, due {due_date}|][, {priority} priority|].",
        "I [have|need] to {task}[ by {due_date}|]. Add it to my [list|to-dos].",
        "Make a [{priority} priority |]to-do [item |]to {task}[, due {due_date}|].",
        "I'd like [a new|a] to-do to {task}[ by {due_date}|][, {priority} priority|].",
        "Could you [stick|put] \"{task}\" on my [task list|to-dos][ with {priority} priority|]?",
        "[Task|To-do] for {due_date}[ ({priority} priority)|]: {task}",
        "[I keep forgetting|I always forget] to {task}. [Put it on my to-do list|Add it "
        "to my task list][ as {priority} priority|].",
        "[Log|Record|Queue up] [a task|an item] to {task}[, due {due_date}|].",
    ),
    "get_directions": (
        "How do I get from {origin} to {destination}[ ({mode})|]?",
        "[Directions|Route] from {origin} to {destination}[, please|].",
        "How long does it take to get from {origin} to {destination}[ ({mode})|]?",
        "[Show|Find] me [a|the] {mode} route from {origin} to {destination}.",
        "How far is it from {origin} to {destination}?",
        "I'm at {origin}. How do I get to {destination}[ ({mode})|]?",
        "[I need|I'd like] [directions|a route] to {destination} from {origin}.",
        "I'm [meeting a friend|due] at {destination} [soon|in an hour]. How long is the [{mode} "
        "|]trip from {origin}?",
        "[Route|Trip|Directions]: {origin} to {destination}[ ({mode})|]",
        "Is {mode} [a good option|quick enough] [from {origin} to {destination}|to get from "
        "{origin} to {destination}]?",
        "[Please |][navigate|guide] me from {origin} to {destination}[ ({mode})|].",
    ),
    "play_music": (
        "[please |]play {query}[ now|].",
        "Put on {query}[ please|].",
        "[I'd like to hear|I'm in the mood for|Let's hear] {query}.",
        "Start [playing |]{query}[ please|].",
        ("Shuffle [my |]{query}[ please|].", {"shuffle": True}),
        ("Play {query} in random order.", {"shuffle": True}),
        _ASK + "put on {query}?",
        "I [need|could use] {query}[ right now| to focus| to relax].",
        ("I'm [cooking|working out|cleaning up]. [Put on|Queue up] {query} and mix up the order.",
         {"shuffle": True}),
        "[Music|Queue]: {query}[, please|]",
        "How about {query}[ now|]?",
        "[Blast|Stream|Queue up|Spin] {query}[ please|].",
    ),
}


# Training vague requests as choice grammars, added after each tool's fixed ones: each leaves
# out exactly one required argument, so the expected reply is a clarifying question.
_VAGUE_GRAMMAR: dict[str, tuple[str, ...]] = {
    "run_python": (
        "Would you [test|try out|execute] a [little|short] Python [snippet|script] for me?",
        "I [need|want] to [run|test] some Python[ code|][ quickly|].",
        "[Run|Execute] my [Python |]snippet[, please|].",
        "I wrote a [small|quick] Python [function|script]. [Can you run it?|Will you run it for "
        "me?|Please execute it.]",
    ),
    "run_shell": (
        "[Can|Could] you run a [terminal|command-line] command[ for me|]?",
        "I [need|want] to run a [quick |]command [in the terminal|on this machine].",
        "Execute a [terminal|bash] command[ for me|].",
        "[Something is off with|I'm debugging] [the server|my setup|the build]. [Can you run a "
        "command for me?|Please run a shell command for me.]",
    ),
    "read_file": (
        "[Can|Could] you [print|show me] a file [from the repo|in the project|]?",
        "I [need|want] to [see|read|check] what's in a [config|source|log] file.",
        "[Print|Cat|Dump] that file[ for me|].",
        "[A setting seems off|I think there's a typo somewhere|Something in the config looks "
        "wrong]. [Show me the file.|Can you read the file for me?]",
    ),
    "search_code": (
        "[Can|Could] you search [{path}|the codebase|the repo] for [something|a string]?",
        "I [need|want] to find where [something|a certain name] is used[ in {path}|].",
        "[Grep|Search] [{path}|the code][, please|].",
        "I'm [renaming|refactoring] [something|a function] in [{path}|the project]. [Can you "
        "search for its uses?|Find every place it appears.]",
    ),
    "write_file": (
        "[Can|Could] you write [some text|a few lines] [to|into] [{path}|`{path}`]?",
        "I [need|want] [this|the text below] in a new file:\n{content}",
        "[Write to|Overwrite|Update] [{path}|`{path}`][, please|].",
        "[I'm done with|I finished] [the draft|this text]. Put it in a file[ for me|]:\n{content}",
    ),
    "pip_install": (
        "[Can|Could] you pip install a [library|dependency] for me[ into this venv|]?",
        "I need [one more|another] [package|library][ in this environment|].",
        "[Install|Add] a dependency[, please|].",
        "[This project|My script] needs [an extra|one more] library. [Can you install it?|Please "
        "install it.]",
    ),
    "find_files": (
        "[Can|Could] you find [some|certain] files[ in {path}| under {path}|] for me?",
        "I [need|want] to locate [a few|some] files[ in {path}| under {path}|].",
        "[Find|Locate] files by [name|pattern][ in {path}|].",
        "I'm [tidying up|reorganizing] [{path}|the repo]. [Find all files of a certain type.|Can "
        "you find files of one kind for me?]",
    ),
    "calculator": (
        "Would you help me [crunch|work out] [a few numbers|some figures]?",
        "I [need|want] [something|a number] [worked out|calculated].",
        "[Calculate|Compute] something[ for me|][, please|].",
        "I'm [doing my taxes|splitting a bill|checking an invoice]. [Can you do the math?|Work "
        "out the total for me.]",
    ),
    "convert_units": (
        "[Can|Could] you convert [my reading|my measurement|a value] from {from_unit} to "
        "{to_unit}[ for me|]?",
        "I [need|want] {value} {from_unit} [converted|expressed in another unit][ for a recipe| "
        "for a report|].",
        "[Change|Turn] {value} {from_unit} into [another|a different] unit[, please|].",
        "[My notes just say|The label only says|The old recipe says] {value}[, no unit| without a "
        "unit]. [Convert it to {to_unit}.|What is that in {to_unit}?]",
    ),
    "get_weather": (
        "[How's|What's] the weather [in my hometown|where my parents live|at my destination][ "
        "today|]?",
        "I [need|want] the [current |]weather[ in {units}|] for [a city|the city I'm flying to].",
        "[Weather|Temperature] check[ in {units}|][, please|].",
        "I'm [packing for a trip|heading out of town|about to travel]. [What's the weather like "
        "there?|Check the weather there for me.]",
    ),
    "get_forecast": (
        "[Can|Could] you get me a multi-day [weather |]forecast [for {city}|for the {city} area]?",
        "I [need|want] the forecast for the next {days} days[ where I'm going| at my "
        "destination|].",
        "{days}-day [forecast|outlook][, please|].",
        "I'm [visiting|traveling to|going to] {city} [soon|next week]. [Show me the forecast for "
        "my stay.|What's the outlook for my trip?]",
    ),
    "create_event": (
        "[Can|Could] you put [{title}|\"{title}\"] on my calendar[ for {duration_minutes} "
        "minutes|]?",
        "I [need|want] [an event|a slot] on my calendar [on|for] {date}[ at {time}|].",
        "[New event|Calendar entry] on {date}[ at {time}|][, {duration_minutes} min|].",
        "[{title}|\"{title}\"] [got moved|was rescheduled|is confirmed]. [Put it on my calendar.|"
        "Can you add it to my calendar?]",
    ),
    "list_events": (
        "[What's|What is] on my [schedule|agenda] for [the day of the conference|my day off|the "
        "day of the move]?",
        "I [need|want] to [check|see] my [calendar|schedule] for a [specific|particular] day.",
        "[Show|List] my [events|appointments] for [a specific date|a particular day].",
        "[A friend wants to meet up|My manager wants a call|I'm planning a dentist visit]. [What "
        "do I have booked that day?|Check my calendar for that day.]",
    ),
    "set_timer": (
        "[Can|Could] you time [the {label}|my {label}] for me?",
        "I [need|want] the {label} timed[, please|].",
        "[Timer|Countdown][ for the {label}|], please.",
        "[I'm starting|I'm about to start] the {label}. [Set a timer for it.|Can you time it for "
        "me?]",
    ),
    "convert_currency": (
        "[How much is|What's] my [budget|balance|deposit] in {from_currency} worth in "
        "{to_currency}?",
        "I [need|want] {amount} {from_currency} [converted|changed into another currency][ before "
        "my trip|].",
        "[Convert|Exchange] {amount} {from_currency}[ into something else| into another "
        "currency][, please|].",
        "[I was quoted|The invoice says|A friend owes me] {amount}[ but no currency| with no "
        "currency named]. [What's that in {to_currency}?|Convert it to {to_currency}.]",
    ),
    "translate_text": (
        "How [do I|would I|do you] say \"{text}\" in [another|a foreign] language?",
        "I [need|want] [a sentence|a phrase|something] translated into {target_language}.",
        "Translate[:|] \"{text}\"[, please|].",
        "[I'm writing to|I'm texting] [a friend|my host family|a pen pal] in {target_language}. "
        "[Can you translate a line for me?|Help me translate a sentence.]",
    ),
    "send_email": (
        "[Can|Could] you send an email [titled|with the subject] \"{subject}\"? [It should say|"
        "The body is]: {body}",
        "I [need|want] to email {to} [about|regarding] \"{subject}\".",
        "[Mail|Email] {to}. [Body|Text]: {body}",
        "[I wrote|I drafted] a [note|message] titled \"{subject}\". [Send it out, please|Please "
        "email it]: {body}",
    ),
    "get_time": (
        "[What's|What is] the local time [where my client is|where my sister lives|in the city "
        "I'm calling]?",
        "I [need|want] to know the [local |current |]time in another city.",
        "Check the local time in [a different|another] city[ for me|].",
        "I have a call with [a client|a colleague|my family] overseas. What time is it [there|"
        "over there][ now| right now|]?",
    ),
    "add_todo": (
        "[Can|Could] you add [a task|an item] to my [to-do|task] list[ for {due_date}|]?",
        "I [need|want] a new [{priority} priority |]to-do[, due {due_date}|].",
        "[New|Add a] to-do[, {priority} priority|][, due {due_date}|].",
        "[I just remembered something|There's something I keep forgetting]. [Put it on my "
        "to-do list.|Can you add it to my tasks?]",
    ),
    "get_directions": (
        "[How do I get|What's the quickest route] from {origin} to [my meeting|the venue|my "
        "hotel][ ({mode})|]?",
        "I [need|want] [directions|a route] to {destination}[ ({mode})|].",
        "[Directions|Route] from {origin}[, please|].",
        "I [have to be|need to be] at {destination} [soon|in an hour]. [How long will the trip "
        "take?|Find me a {mode} route.]",
    ),
    "play_music": (
        "[Can|Could] you play [a song|an album|a playlist] I['m thinking of| have in mind]?",
        "[I'd like|I want] to hear a [particular|specific] [song|artist|album].",
        "[Play|Queue up|Start] my [playlist|album|mix][, please|].",
        "[There's a song stuck in my head|I heard a great album yesterday]. [Can you play it?|"
        "Play it for me.]",
    ),
}


def _choice(values: tuple) -> Callable[[Rng], Any]:
    return lambda rng: rng.choice(values)


def _developer_tools() -> list[ToolDef]:
    return [
        _tool("run_python", "", "developer",
              [Param("code", "string", "Python source code to run", _python_snippet,
                     ask=("Sure, which code should I run?", "What Python code do you want me "
                          "to run?"))],
              requests=("Run this Python code:\n```python\n{code}\n```",
                        "Can you execute this and tell me the output?\n{code}",
                        "What does this print?\n```\n{code}\n```",
                        "Execute the following Python:\n{code}",
                        "Run this snippet:\n{code}"),
              eval_requests=("Try running this for me:\n```python\n{code}\n```",
                             "I need the output of this Python code:\n{code}"),
              vague=("Can you run some Python code for me?", "Execute a Python script, please."),
              eval_vague=("I have a snippet I want you to run.",),
              respond=_respond_run_python),
        _tool("run_shell", "", "developer",
              [Param("command", "string", "the shell command", _shell_command,
                     ask=("Which command should I run?", "Sure, what command?"))],
              requests=("Run `{command}`.", "Execute `{command}` in the shell.",
                        "Show me the output of `{command}`.",
                        "Please run this command: {command}", "Can you run {command} for me?"),
              eval_requests=("Run the shell command `{command}` and show me the result.",
                             "Try `{command}` in the terminal."),
              vague=("Run a shell command for me.", "Can you execute something in bash?"),
              eval_vague=("Please run a command in the terminal.",),
              respond=_respond_run_shell),
        _tool("read_file", "", "developer",
              [Param("path", "string", "file path", _file_path,
                     ask=("Which file should I read?", "Sure, which file?"))],
              requests=("Show me the contents of {path}.", "Read {path}.", "What's in `{path}`?",
                        "Open {path} and show it to me.", "Can you print the file {path}?"),
              eval_requests=("Let me see {path}, please.", "Display the file `{path}`."),
              vague=("Can you read a file for me?", "Show me the contents of the file."),
              eval_vague=("Open the file, please.",),
              respond=_respond_read_file),
        _tool("list_files", "", "developer",
              [Param("path", "string", "directory path", _directory, required=False)],
              requests=("List the files in {path}.", "What files are in `{path}`?",
                        "Show me what's inside {path}.", "List the files here.",
                        "What's in the current directory?"),
              eval_requests=("Which files does {path} contain?",
                             "Give me a listing of the working directory."),
              respond=_respond_list_files),
        _tool("search_code", "", "developer",
              [Param("pattern", "string", "regular expression", _choice(SEARCH_PATTERNS),
                     ask=("What should I search for?", "Which text or pattern should I look "
                          "for?")),
               Param("path", "string", "where to search", _directory, required=False)],
              requests=("Search the code for `{pattern}`.",
                        "Find where `{pattern}` appears in {path}.",
                        "Grep for {pattern} in {path}.", "Where is `{pattern}` used?",
                        "Look for `{pattern}` in the codebase."),
              eval_requests=("Which files under {path} mention `{pattern}`?",
                             "Find all occurrences of `{pattern}`."),
              vague=("Search the code in {path} for me.", "Can you grep the project?"),
              eval_vague=("Look something up in the code under {path}.",),
              respond=_respond_search_code),
        _tool("write_file", "", "developer",
              [Param("path", "string", "file path", _file_path,
                     ask=("What should I name the file?", "Which path should I save it to?")),
               Param("content", "string", "file content", lambda rng: "",
                     ask=("What should the file contain?", "Sure, what content should it "
                          "have?"))],
              requests=("Write this to {path}:\n{content}",
                        "Create a file {path} with this content:\n{content}",
                        "Save the following to `{path}`:\n{content}",
                        "Put this text into {path}:\n{content}"),
              eval_requests=("Make a new file called {path} containing:\n{content}",
                             "Overwrite {path} with:\n{content}"),
              vague=("Create a file called {path}.", "Save this to a file:\n{content}"),
              eval_vague=("Write a new file {path} for me.",),
              respond=_respond_write_file,
              joint=lambda values, rng: values.update(content=file_content(values["path"],
                                                                           rng)[0])),
        _tool("git_status", "", "developer", [],
              requests=("What's the git status?", "Are there any uncommitted changes?",
                        "Show me the status of the repository.", "Which files have I modified?",
                        "Check git status, please."),
              eval_requests=("Did I leave anything uncommitted?",
                             "What's changed in the working tree?"),
              respond=_respond_git_status),
        _tool("git_diff", "Show uncommitted changes (git diff).",
              "developer",
              [Param("path", "string", "", _python_path,
                     required=False)],
              requests=("Show me the diff.", "What changed in {path}?",
                        "Show the git diff for {path}.", "What are my unstaged changes?"),
              eval_requests=("Let me see the diff of {path}.", "Which lines did I change?"),
              respond=_respond_git_diff),
        _tool("git_log", "Show recent commits, newest first.", "developer",
              [Param("max_count", "integer", "", lambda rng: rng.randint(2, 5),
                     required=False, minimum=1),
               Param("path", "string", "", _python_path,
                     required=False)],
              requests=("Show the last {max_count} commits.", "What are the recent commits?",
                        "Show the commit history of {path}.",
                        "List the last {max_count} commits that touched {path}."),
              eval_requests=("Who committed what recently? Show {max_count} entries.",),
              respond=_respond_git_log),
        _tool("run_tests", "Run the tests with pytest.",
              "developer",
              [Param("path", "string", "", _test_target, required=False),
               Param("verbose", "boolean", "", lambda rng: True, required=False)],
              requests=("Run the tests.", "Run the tests in {path}.",
                        ("Run the tests in {path} verbosely.", {"verbose": True}),
                        "Do the tests in {path} pass?",
                        ("Run the whole test suite with verbose output.", {"verbose": True}),
                        ("Run {path} quietly, no verbose output.", {"verbose": False})),
              eval_requests=("Check whether the test suite passes.",
                             ("Run {path} in verbose mode.", {"verbose": True})),
              respond=_respond_run_tests),
        _tool("pip_install", "Install a Python package with pip.", "developer",
              [Param("package", "string", "", _choice(tuple(PACKAGES)),
                     ask=("Which package should I install?",)),
               Param("version", "string", "", lambda rng: "", required=False)],
              requests=("Install {package}.", "pip install {package}, please.",
                        "Install version {version} of {package}.",
                        "Add the {package} package, version {version}."),
              eval_requests=("I need {package} installed.",
                             "Can you install {package}=={version}?"),
              vague=("Install a Python package for me.",),
              eval_vague=("Please pip install something.",),
              respond=_respond_pip_install,
              joint=lambda values, rng: values.update(version=PACKAGES[values["package"]])),
        _tool("lint_file", "Check a Python file for lint errors.", "developer",
              [Param("path", "string", "", _python_path,
                     ask=("Which file should I lint?",))],
              requests=("Lint {path}.", "Check {path} for style problems.",
                        "Are there any lint errors in {path}?"),
              eval_requests=("Run the linter on {path}.",),
              vague=("Lint my file, please.",),
              respond=_respond_lint_file),
        _tool("find_files", "Find files by name pattern.", "developer",
              [Param("pattern", "string", "glob, e.g. *.py", _choice(GLOBS),
                     ask=("Which file name pattern should I look for?",)),
               Param("path", "string", "", _directory, required=False)],
              requests=("Find all {pattern} files.", "Find files matching `{pattern}` in {path}.",
                        "Which `{pattern}` files are under {path}?",
                        "Locate every file named like {pattern}."),
              eval_requests=("Search {path} for files matching {pattern}.",
                             "Get me a list of the {pattern} files."),
              vague=("Find some files in {path} for me.",),
              eval_vague=("Locate files under {path}.",),
              respond=_respond_find_files),
    ]


def _everyday_tools_1() -> list[ToolDef]:
    return [
        _tool("calculator", "Evaluate an arithmetic expression.", "everyday",
              [Param("expression", "string", "", _expression,
                     ask=("Sure, what should I calculate?", "Which expression?"))],
              requests=("What is {expression}?", "Calculate {expression}.",
                        "Compute {expression} for me.", "How much is {expression}?",
                        "Work out {expression}."),
              eval_requests=("Can you evaluate {expression}?",
                             "I need the result of {expression}."),
              vague=("I need help with a calculation.",), eval_vague=("Can you do some math?",),
              respond=_respond_calculator),
        _tool("convert_units", "Convert a length, mass or temperature.", "everyday",
              [Param("value", "number", "", lambda rng: _number(rng.choice(
                  (rng.randint(1, 200), rng.randint(1, 1000) / 10))),
                     ask=("How much should I convert?",)),
               Param("from_unit", "string", "", _choice(tuple(UNITS)), enum=tuple(UNITS),
                     ask=("Which unit is that value in?",)),
               Param("to_unit", "string", "", _choice(tuple(UNITS)), enum=tuple(UNITS),
                     ask=("Which unit should I convert to?", "Convert it to what?"))],
              requests=("Convert {value} {from_unit} to {to_unit}.",
                        "How many {to_unit} is {value} {from_unit}?",
                        "What is {value} {from_unit} in {to_unit}?",
                        "{value} {from_unit} in {to_unit}, please."),
              eval_requests=("I have {value} {from_unit}. How much is that in {to_unit}?",
                             "Change {value} {from_unit} into {to_unit}."),
              vague=("Convert {value} {from_unit} for me.", "What is {value} in {to_unit}?"),
              eval_vague=("I have {value} {from_unit} that I need in another unit.",),
              respond=_respond_convert_units, joint=_joint_units),
        _tool("get_weather", "Get the current weather for a city.", "everyday",
              [Param("city", "string", "", _choice(CITIES),
                     ask=("Which city should I check?", "For which city?")),
               Param("units", "string", "", _choice(("celsius", "fahrenheit")),
                     required=False, enum=("celsius", "fahrenheit"))],
              requests=("What's the weather in {city}?", "How's the weather in {city} right now?",
                        "Is it raining in {city}?", "Tell me the current weather in {city} in "
                        "{units}.", "Weather for {city} in {units}, please."),
              eval_requests=("What's it like outside in {city} today?",
                             "Give me the temperature in {city} in {units}."),
              vague=("What's the weather like?", "Tell me the weather in {units}."),
              eval_vague=("Is it cold outside right now?",),
              respond=_respond_weather),
        _tool("get_forecast", "Get the weather forecast.", "everyday",
              [Param("city", "string", "", _choice(CITIES), ask=("For which city?",)),
               Param("days", "integer", "", lambda rng: rng.randint(2, 3),
                     minimum=1, maximum=7, ask=("For how many days?",))],
              requests=("What's the forecast for {city} for the next {days} days?",
                        "Give me a {days}-day forecast for {city}.",
                        "Will it rain in {city} over the next {days} days?",
                        "Forecast for {city}, {days} days."),
              eval_requests=("How will the weather be in {city} for the coming {days} days?",),
              vague=("What's the forecast for the next {days} days?",
                     "Give me the forecast for {city}."),
              eval_vague=("Give me a {days}-day forecast.",),
              respond=_respond_forecast),
        _tool("create_event", "Add an event to the calendar.", "everyday",
              [Param("title", "string", "", _choice(EVENT_TITLES),
                     ask=("What should I call the event?",)),
               Param("date", "string", "YYYY-MM-DD", _date, ask=("What date is it on?",
                                                                  "Which day should I add it to?")),
               Param("time", "string", "HH:MM", _time, required=False),
               Param("duration_minutes", "integer", "", lambda rng: rng.choice((15, 30, 45, 60,
                                                                                90)),
                     required=False, minimum=1),
               Param("all_day", "boolean", "", lambda rng: True, required=False)],
              requests=("Add \"{title}\" to my calendar on {date} at {time}.",
                        "Schedule {title} on {date} at {time} for {duration_minutes} minutes.",
                        "Create an event called {title} on {date}.",
                        ("Put an all-day event \"{title}\" on {date}.", {"all_day": True}),
                        "Book {title} for {date} at {time}."),
              eval_requests=("Please set up \"{title}\" on {date}, starting at {time}.",
                             ("Block the whole day of {date} for {title}.", {"all_day": True})),
              vague=("Add {title} to my calendar.", "Schedule a meeting on {date} at {time}."),
              eval_vague=("Create a calendar event called {title}, please.",),
              respond=_respond_create_event),
        _tool("list_events", "List the calendar events of one day.", "everyday",
              [Param("date", "string", "YYYY-MM-DD", _date,
                     ask=("Which date should I check?", "For which day?"))],
              requests=("What's on my calendar on {date}?", "Do I have any events on {date}?",
                        "List my meetings for {date}.", "Show my schedule for {date}."),
              eval_requests=("Am I free on {date}?", "What have I got planned for {date}?"),
              vague=("What's on my calendar?",), eval_vague=("Show me my schedule.",),
              respond=_respond_list_events),
        _tool("set_timer", "Start a countdown timer.", "everyday",
              [Param("minutes", "integer", "", lambda rng: rng.randint(1, 90), minimum=1,
                     ask=("For how many minutes?", "How long should the timer run?")),
               Param("label", "string", "", _choice(TIMER_LABELS), required=False)],
              requests=("Set a timer for {minutes} minutes.",
                        "Start a {minutes}-minute timer for the {label}.",
                        "Timer for {minutes} minutes, please.",
                        "Set a {minutes} minute timer labeled {label}."),
              eval_requests=("Count down {minutes} minutes for the {label}.",
                             "I need a {minutes} minute countdown."),
              vague=("Set a timer.", "Start a timer for the {label}."),
              eval_vague=("I need a timer for the {label}.",),
              respond=_respond_set_timer),
        _tool("set_reminder", "Create a reminder at a date and time.", "everyday",
              [Param("text", "string", "", _choice(TASKS),
                     ask=("What should I remind you about?",)),
               Param("date", "string", "YYYY-MM-DD", _date, ask=("On which date?",)),
               Param("time", "string", "HH:MM", _time, ask=("What time should I remind you?",))],
              requests=("Remind me to {text} on {date} at {time}.",
                        "Set a reminder for {date} at {time}: {text}.",
                        "Don't let me forget to {text} on {date} at {time}."),
              eval_requests=("Create a reminder to {text} at {time} on {date}.",),
              vague=("Remind me to {text} on {date}.", "Set a reminder for {date} at {time}."),
              respond=_respond_set_reminder),
    ]


def _everyday_tools_2() -> list[ToolDef]:
    return [
        _tool("convert_currency", "Convert money between currencies.", "everyday",
              [Param("amount", "number", "", lambda rng: _number(rng.choice(
                  (rng.randint(5, 2000), rng.randint(100, 50000) / 100))),
                     ask=("How much money should I convert?",)),
               Param("from_currency", "string", "", _choice(CURRENCIES), enum=CURRENCIES,
                     ask=("Which currency is the amount in?",)),
               Param("to_currency", "string", "", _choice(CURRENCIES), enum=CURRENCIES,
                     ask=("Which currency should I convert to?", "Into which currency?"))],
              requests=("Convert {amount} {from_currency} to {to_currency}.",
                        "How much is {amount} {from_currency} in {to_currency}?",
                        "What's {amount} {from_currency} worth in {to_currency}?",
                        "Exchange {amount} {from_currency} into {to_currency}."),
              eval_requests=("I want to know what {amount} {from_currency} comes to in "
                             "{to_currency}.", "{amount} {from_currency} to {to_currency}?"),
              vague=("Convert {amount} {from_currency} for me.",
                     "How much is that in {to_currency}? It's {amount}."),
              eval_vague=("How much is {amount} {from_currency} in another currency?",),
              respond=_respond_currency, joint=_joint_currencies),
        _tool("translate_text", "Translate text into another language.", "everyday",
              [Param("text", "string", "", _choice(tuple(TRANSLATIONS)),
                     ask=("What text should I translate?",)),
               Param("target_language", "string", "", _choice(LANGUAGES), enum=LANGUAGES,
                     ask=("Which language should I translate it into?", "Into which language?"))],
              requests=("Translate \"{text}\" into {target_language}.",
                        "How do you say \"{text}\" in {target_language}?",
                        "What is \"{text}\" in {target_language}?",
                        "Translate this to {target_language}: {text}"),
              eval_requests=("Can you put \"{text}\" into {target_language}?",
                             "Say \"{text}\" in {target_language}, please."),
              vague=("Translate \"{text}\" for me.", "Translate something into "
                     "{target_language}."),
              eval_vague=("How would \"{text}\" sound in another language?",),
              respond=_respond_translate),
        _tool("send_email", "Send an email.", "everyday",
              [Param("to", "array", "", _emails, items="string",
                     ask=("Who should I send it to?", "What's the recipient's address?")),
               Param("subject", "string", "", _choice(EMAIL_SUBJECTS),
                     ask=("What subject line should I use?",)),
               Param("body", "string", "", _choice(EMAIL_BODIES),
                     ask=("What should the email say?",))],
              requests=("Email {to} with the subject \"{subject}\" and say: {body}",
                        "Send an email to {to}. Subject: {subject}. Message: {body}",
                        "Write to {to} with subject \"{subject}\": {body}",
                        "Send {to} a message titled \"{subject}\" that says: {body}"),
              eval_requests=("Drop {to} an email, subject \"{subject}\", body: {body}",),
              vague=("Send an email to {to} about \"{subject}\".",
                     "Email {to} saying: {body}"),
              eval_vague=("Send an email with the subject \"{subject}\" saying: {body}",),
              respond=_respond_send_email),
        _tool("get_time", "Get the local time in a city.", "everyday",
              [Param("city", "string", "", _choice(CITIES), ask=("Which city do you mean?",))],
              requests=("What time is it in {city}?", "What's the local time in {city}?",
                        "Tell me the current time in {city}.", "Time in {city} right now?"),
              eval_requests=("Is it late in {city} right now? What's the time there?",),
              vague=("What time is it over there?",), eval_vague=("What's the local time?",),
              respond=_respond_get_time),
        _tool("define_word", "Look up the definition of a word.", "everyday",
              [Param("word", "string", "", _choice(tuple(DEFINITIONS)), ask=("Which word?",))],
              requests=("Define \"{word}\".", "What does the word {word} mean?",
                        "Give me the definition of {word}."),
              eval_requests=("Look up the meaning of \"{word}\".",),
              vague=("Can you define a word for me?",),
              respond=_respond_define_word),
        _tool("get_stock_price", "Get the latest price of a stock.", "everyday",
              [Param("symbol", "string", "", _choice(tuple(STOCKS)),
                     ask=("Which ticker symbol?",))],
              requests=("What's the stock price of {symbol}?", "How much is {symbol} trading at?",
                        "Get me the current price of {symbol} shares."),
              eval_requests=("Quote {symbol} for me.",),
              vague=("Check a stock price for me.",),
              respond=_respond_stock),
        _tool("add_todo", "Add a task to the to-do list.", "everyday",
              [Param("task", "string", "", _choice(TASKS), ask=("What should the task say?",)),
               Param("due_date", "string", "YYYY-MM-DD", _date, required=False),
               Param("priority", "string", "", _choice(("low", "medium", "high")),
                     required=False, enum=("low", "medium", "high"))],
              requests=("Add \"{task}\" to my to-do list.",
                        "Put {task} on my todo list, due {due_date}.",
                        "Add a {priority} priority task: {task}.",
                        "New to-do: {task}, due {due_date}, {priority} priority."),
              eval_requests=("Note down the task \"{task}\" with {priority} priority.",
                             "Track this for me: {task}."),
              vague=("Add something to my to-do list.",),
              eval_vague=("Create a new to-do item due {due_date}.",),
              respond=_respond_add_todo),
        _tool("get_directions", "Get travel distance and time.",
              "everyday",
              [Param("origin", "string", "", _choice(PLACES),
                     ask=("Where are you starting from?",)),
               Param("destination", "string", "", _choice(PLACES),
                     ask=("Where do you want to go?",)),
               Param("mode", "string", "", _choice(("driving", "walking", "cycling", "transit")),
                     required=False, enum=("driving", "walking", "cycling", "transit"))],
              requests=("How do I get from {origin} to {destination}?",
                        "Give me {mode} directions from {origin} to {destination}.",
                        "How long is the {mode} route from {origin} to {destination}?",
                        "How far is {destination} from {origin}?"),
              eval_requests=("What's the best way from {origin} to {destination}?",
                             "Plan a {mode} trip from {origin} to {destination}."),
              vague=("How do I get to {destination}?",),
              eval_vague=("I need directions from {origin}.",),
              respond=_respond_directions, joint=_joint_route),
        _tool("play_music", "Play a song, artist or playlist.", "everyday",
              [Param("query", "string", "", _choice(MUSIC),
                     ask=("What would you like to listen to?",)),
               Param("shuffle", "boolean", "", lambda rng: True, required=False)],
              requests=("Play {query}.", "Put {query} on.",
                        ("Shuffle {query}.", {"shuffle": True}), "I want to listen to {query}."),
              eval_requests=("Turn on {query}.",
                             ("Play {query} on shuffle.", {"shuffle": True})),
              vague=("Play some music.",), eval_vague=("Put something on, please.",),
              respond=_respond_play_music),
    ]


TOOLS: tuple[ToolDef, ...] = tuple(_developer_tools() + _everyday_tools_1()
                                   + _everyday_tools_2())
TOOLS_BY_NAME: dict[str, ToolDef] = {tool.name: tool for tool in TOOLS}


def check_library(tools: tuple[ToolDef, ...] = TOOLS) -> list[str]:
    """Return every inconsistency between the tools' schemas, templates and generators."""
    problems = []
    for tool in tools:
        names = {param.name for param in tool.params}
        schema = tool.spec()["function"]["parameters"]
        if set(schema["properties"]) != names:
            problems.append(f"{tool.name}: spec parameters {sorted(schema['properties'])} differ "
                            f"from the generators' {sorted(names)}")
        required = {param.name for param in tool.params if param.required}
        if set(schema.get("required", [])) != required:
            problems.append(f"{tool.name}: spec requires {sorted(schema.get('required', []))}, "
                            f"the generators {sorted(required)}")
        for param in tool.params:
            if param.type not in JSON_TYPES:
                problems.append(f"{tool.name}.{param.name}: unknown type {param.type!r}")
        plain = {pool: _plain_templates(getattr(tool, pool), problems)
                 for pool in ("requests", "eval_requests", "vague", "eval_vague")}
        for template in plain["requests"] + plain["eval_requests"]:
            unknown = set(template.fields) - names
            if unknown:
                problems.append(f"{template.id}: unknown placeholders {sorted(unknown)} in "
                                f"{template.text!r}")
            if tool.missing(template):
                problems.append(f"{template.id}: required {tool.missing(template)} not in "
                                f"{template.text!r}")
            for name in set(template.fields) & names:
                if tool.param(name).type == "boolean":
                    problems.append(f"{template.id}: boolean {name} must be fixed, not written")
        for template in plain["vague"] + plain["eval_vague"]:
            missing = tool.missing(template)
            if len(missing) != 1:
                problems.append(f"{template.id}: must leave out exactly one required argument, "
                                f"leaves out {missing} in {template.text!r}")
            elif not tool.param(missing[0]).ask:
                problems.append(f"{template.id}: {missing[0]} has no clarifying question")
        problems += _leaks(plain["requests"], plain["eval_requests"])
        problems += _leaks(plain["vague"], plain["eval_vague"])
    return problems


def _plain_templates(templates: tuple[Template, ...], problems: list[str]) -> list[Template]:
    """Return every expansion of `templates`, adding each malformed choice group to `problems`."""
    plain = []
    for template in templates:
        try:
            plain.extend(template.expansions())
        except ValueError as error:
            problems.append(str(error))
    return plain


# Words that a phrasing may add or drop without becoming another phrasing.
_FILLER = frozenset("please can could would you for me the a an just kindly".split())


def phrasing_key(text: str) -> str:
    """Reduce a template text to its content words: lowercase, no punctuation, no fillers.

    Two phrasings with the same key count as the same phrasing when evaluation-only phrasings
    are checked against training ones.
    """
    words = re.findall(r"\{\w+\}|[a-z0-9'-]+", text.lower())
    return " ".join(word for word in words if word not in _FILLER)


def _leaks(train: list[Template], evaluation: list[Template]) -> list[str]:
    """Return a problem for each evaluation phrasing that equals a training expansion."""
    seen = {phrasing_key(template.text): template for template in train}
    problems = []
    for template in evaluation:
        twin = seen.get(phrasing_key(template.text))
        if twin is not None:
            problems.append(f"{template.id}: evaluation phrasing {template.text!r} equals the "
                            f"training phrasing {twin.text!r} of {twin.id}")
    return problems
