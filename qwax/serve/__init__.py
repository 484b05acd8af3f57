"""Serving a checkpoint: the OpenAI-compatible HTTP server (`qwax serve`) and the terminal chat (`qwax chat`).

scheduler: batches requests onto the model in a worker thread; protocol: the API's request bodies and errors;
app: the HTTP routes; loading: what a checkpoint directory provides; cli / chat: the commands.
"""
