"""The HTTP routes, one module per endpoint family; app/server.py mounts their routers."""
