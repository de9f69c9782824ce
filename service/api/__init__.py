"""The HTTP API: versioned routers, dependencies and error mapping."""
