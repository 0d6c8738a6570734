"""Shared core of the ChatGLM-6B fine-tuning suite."""
