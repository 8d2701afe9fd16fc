"""The bundled demo data set: scenes, their pixels, teacher captions, the vocabulary, and the two demo projects. Imports leaml.data and below."""
