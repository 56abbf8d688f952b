"""Screens of the chat UI: modal screens return their result through ``dismiss``."""
