"""
The cim client library and console.
"""
