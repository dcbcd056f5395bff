"""
The cim IM server: client TCP connections, sessions, delivery, push API.
"""
