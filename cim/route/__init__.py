"""
The cim route: the HTTP API for accounts, login, routing and history.
"""
