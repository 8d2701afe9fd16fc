"""Background jobs: the queue API, the job kinds, the worker process (started only as a subprocess) and the settings a queued job trains with. Imports leaml.methods and below."""
