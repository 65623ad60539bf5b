"""`codeling pipeline RECIPE.yaml`: run the stages a recipe names, in order, in one run directory.

A recipe is a run config (shared by every stage) plus a `stages` mapping from stage name to that
stage's overrides:

    name: cpu-tiny
    model: dense-tiny
    train: {batch_size: 16, seq_len: 256}
    stages:
      tokenizer: {}
      language: {data: {sources: [tinystories], fallback_sources: [python-docs]}}
      code: {init_from: language, data: {sources: [python-stdlib], replay_fraction: 0.1}}
      eval: {suites: [bpb, syntax, humaneval]}

Every stage's config is built and validated before the first stage starts, and all problems are
reported together. On a rerun, a stage that finished (its `done.json` exists) is skipped and a
stage with a checkpoint resumes from it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from codeling.config import (RunConfig, apply_overrides, config_from_dict, config_to_dict,
                             load_yaml)
from codeling.data import chat_data
from codeling.data.preferences import is_preference_source
from codeling.errors import CodelingError, ConfigError
from codeling.stages import pretrain
from codeling.training import checkpoint as ckpt

log = logging.getLogger(__name__)

# Stages in the order they run. Training stages take a run config; the others do not.
STAGE_ORDER = ("tokenizer", "data", "language", "code", "tools", "rlhf", "eval")
TRAINING_STAGES = ("language", "code", "tools", "rlhf")


def deep_merge(base: dict, changes: dict) -> dict:
    """Return `base` with `changes` merged in, recursing into nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _expand_model(raw: dict) -> dict:
    """Write a `model: NAME` shorthand as a mapping, so stage overrides can merge into it."""
    if isinstance(raw.get("model"), str):
        raw = {**raw, "model": {"preset": raw["model"]}}
    return raw


class Plan:
    """The validated stages of a recipe: a run config per training stage, eval settings."""

    def __init__(self, path: str, base: RunConfig, stages: dict[str, Any],
                 configs: dict[str, RunConfig], eval_settings: dict):
        self.path = path
        self.base = base
        self.stages = stages
        self.configs = configs
        self.eval_settings = eval_settings

    @property
    def run_dir(self) -> Path:
        return self.base.resolved_run_dir()


def build_plan(path: str, overrides: list[str] | None = None) -> Plan:
    """Read a recipe, build every stage's config, and raise one error listing all problems."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    stages = raw.pop("stages", None)
    if not isinstance(stages, dict) or not stages:
        raise ConfigError([f"stages: missing or empty; list the stages to run, a mapping with "
                           f"keys from {', '.join(STAGE_ORDER)}"], source=path)
    problems: list[str] = []
    unknown = [name for name in stages if name not in STAGE_ORDER]
    if unknown:
        problems.append(f"stages: unknown stage {unknown[0]!r}; allowed: {', '.join(STAGE_ORDER)}")
    known = [name for name in stages if name in STAGE_ORDER]
    if known != sorted(known, key=STAGE_ORDER.index):
        problems.append(f"stages: {', '.join(known)} are out of order; list them as "
                        f"{', '.join(n for n in STAGE_ORDER if n in known)}")
    raw = _expand_model(raw)
    base = _collect(lambda: config_from_dict(raw, source=path), problems)
    configs = {}
    for name in known:
        settings = stages[name] or {}
        if not isinstance(settings, dict):
            problems.append(f"stages.{name}: expected a mapping of overrides, got {settings!r}")
            continue
        if name in TRAINING_STAGES:
            merged = deep_merge(raw, _expand_model({**settings, "stage": name}))
            config = _collect(lambda: config_from_dict(merged, source=f"stages.{name}"),
                              problems)
            if config is not None:
                configs[name] = config
        elif name == "eval":
            from codeling.evaluation.suite import build_eval_config

            _collect(lambda: build_eval_config(settings, source="stages.eval"), problems)
        elif settings:
            problems.append(f"stages.{name}: takes no settings (it uses the shared tokenizer "
                            f"and data sections), got {settings!r}")
    if problems:
        raise ConfigError(problems, source=path)
    return Plan(path, base, {name: stages[name] or {} for name in known}, configs,
                stages.get("eval") or {})


def _collect(build, problems: list[str]):
    try:
        return build()
    except ConfigError as error:
        problems.extend(f"{error.source}: {problem}" if error.source != "config" else problem
                        for problem in error.problems)
        return None


# -- running ---------------------------------------------------------------------------------------


def _tokenizer_sources(plan: Plan) -> list[str]:
    """Sources for stage 0: tokenizer.sources, else every training stage's data sources."""
    if plan.base.tokenizer.sources:
        return list(plan.base.tokenizer.sources)
    specs: list[str] = []
    for config in plan.configs.values():
        specs += [s for s in config.data.sources if s not in specs
                  and not chat_data.is_chat_source(s) and not is_preference_source(s)]
    return specs


def _fallbacks(plan: Plan) -> list[str]:
    specs: list[str] = list(plan.base.data.fallback_sources)
    for config in plan.configs.values():
        specs += [s for s in config.data.fallback_sources if s not in specs]
    return specs


def run_tokenizer_stage(plan: Plan) -> None:
    """Train the run's tokenizer unless it exists (stage 0)."""
    target = plan.run_dir / "tokenizer" / "tokenizer.json"
    if target.is_file():
        log.info("stage tokenizer: done (%s exists), skipping", target)
        return
    config = copy.deepcopy(plan.base)
    config.tokenizer.sources = pretrain.resolve_sources(_tokenizer_sources(plan),
                                                        _fallbacks(plan))
    pretrain.ensure_tokenizer(config, plan.run_dir)


def run_data_stage(plan: Plan) -> None:
    """Tokenize the sources of every training stage into the run's shared shards."""
    tokenizer = pretrain.ensure_tokenizer(plan.base, plan.run_dir)
    for name, config in plan.configs.items():
        config = copy.deepcopy(config)
        chat_specs = [s for s in config.data.sources if chat_data.is_chat_source(s)]
        if config.train.objective in ("dpo", "grpo"):
            # Preference pairs and RL prompts come from the previous stage's model, so they
            # are built when their stage starts.
            continue
        if chat_specs:
            # Conversations are rendered when their stage starts; generate the synthetic set now.
            for spec in chat_specs:
                if chat_data.chat_source_name(spec) == chat_data.TOOL_CONVERSATIONS:
                    chat_data.ensure_tool_dataset(plan.run_dir, chat_data.tool_examples_of(spec))
            config.data.sources = []
        else:
            config.data.sources = pretrain.resolve_sources(config.data.sources,
                                                           config.data.fallback_sources)
        _fill_replay(plan, name, config)
        pretrain.ensure_data(config, plan.run_dir, tokenizer)


def _fill_replay(plan: Plan, name: str, config: RunConfig) -> None:
    """Replay the sources the previous training stage actually used, when none are named."""
    if config.data.replay_fraction <= 0 or config.data.replay_sources:
        return
    index = TRAINING_STAGES.index(name)
    earlier = [stage for stage in TRAINING_STAGES[:index] if stage in plan.configs]
    if not earlier:
        raise CodelingError(f"stages.{name}: data.replay_fraction is set but no earlier "
                            "training stage exists to replay; name data.replay_sources")
    previous = plan.configs[earlier[-1]]
    done = plan.run_dir / earlier[-1] / "done.json"
    used = json.loads(done.read_text())["sources"] if done.is_file() else None
    config.data.replay_sources = used or pretrain.resolve_sources(
        previous.data.sources, previous.data.fallback_sources)


def run_training_stage(plan: Plan, name: str) -> bool:
    """Run, resume or skip one training stage; return False when it stopped early."""
    config = copy.deepcopy(plan.configs[name])
    stage_dir = plan.run_dir / name
    if (stage_dir / "done.json").is_file():
        log.info("stage %s: done (%s exists), skipping", name, stage_dir / "done.json")
        return True
    _fill_replay(plan, name, config)
    resume = ckpt.latest_checkpoint(stage_dir) is not None
    log.info("stage %s: %s", name, "resuming from its latest checkpoint" if resume else "starting")
    result = pretrain.run_training(config, resume=resume)
    return result.stop_reason not in ("interrupted", "SIGTERM")


def run_eval_stage(plan: Plan) -> None:
    """Evaluate the last training stage's checkpoint and write the report card."""
    from codeling.evaluation.suite import build_eval_config, run_eval_stage as evaluate

    evaluate(plan.run_dir, build_eval_config(plan.eval_settings, source="stages.eval"))


def run_pipeline(path: str, overrides: list[str] | None = None) -> int:
    """Run every stage of a recipe in order; return 0, or 130 when a stage stopped early."""
    plan = build_plan(path, overrides)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(
        {"recipe": str(path), "overrides": overrides or [],
         "stages": {name: config_to_dict(config) for name, config in plan.configs.items()},
         "eval": plan.eval_settings}, sort_keys=False))
    started = time.perf_counter()
    for name in plan.stages:
        stage_start = time.perf_counter()
        log.info("=== stage %s ===", name)
        if name == "tokenizer":
            run_tokenizer_stage(plan)
        elif name == "data":
            run_data_stage(plan)
        elif name in TRAINING_STAGES:
            if not run_training_stage(plan, name):
                log.info("pipeline stopped during stage %s; rerun the same command to resume",
                         name)
                return 130
        elif name == "eval":
            run_eval_stage(plan)
        log.info("stage %s took %.1f minutes", name, (time.perf_counter() - stage_start) / 60)
    log.info("pipeline finished in %.1f minutes; run directory %s",
             (time.perf_counter() - started) / 60, plan.run_dir)
    return 0
