"""An OpenAI-compatible HTTP server for codeling models (`codeling serve`).

Needs the optional packages fastapi and uvicorn; importing this package itself needs neither.
"""
