"""Serving: the OpenAI-compatible server over any model, its HTTP side and limits, and the teacher client that captions images. Imports leaml.engine and below."""
