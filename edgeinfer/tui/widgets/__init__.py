"""Widgets of the chat UI. None imports torch, llama.cpp or a backend module."""
