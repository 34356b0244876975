"""Serving: what generates tokens and how the trainer reaches it.

`launcher` starts SGLang servers (and the router), `client` talks to them over HTTP,
`contract` holds the request and response shapes of SGLang's API that both sides obey,
and `server` is the embedded CPU server that implements the same API for local runs and tests.
"""
