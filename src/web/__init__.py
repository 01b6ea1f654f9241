"""The web demo (`python -m src.app`, `uniportrait-app`; src/cli/app.py): a gradio page over the same pipeline
as `python -m src.generate`.

Modules: `handlers` (uploads -> faces -> identities -> the pipeline's `__call__`, every user error a message),
`ui` (the gradio page and its server), `examples` (the tiny world's held-out identities as examples).
`ui` imports gradio; `handlers` does not, so the request handling is tested without a server.
"""
