"""LEAML Studio: label-efficient adaptation of vision-language models.

The package is layered; each layer imports only those before it (tests/test_layers.py checks):

    config, auth   torch-free settings, config dataclasses, roles and passwords
    store/         SQLite: projects, images, QA and the review queue, runs, jobs, users, events
    data/          import and its checks, export, the label split, the bundled demo set
    engine/        models, batches, training, evaluation, the QA generator, pseudo QA, neurons
    tiny/          the embedded tiny bases: build, corpus, pretraining, committed assets
    serve/         the OpenAI-compatible server and the teacher client
    methods/       the methods as named stages (LEAML's among them), the simulated reviewer
    jobs/          the job queue, job kinds and the worker process
    app/           the permission-checked service the Streamlit pages call
    cli/           ``python -m leaml``: thin commands
"""
import os

# OpenMP threads that wait for work by spinning burn the CPU other processes need: on a
# shared 2-core box (app + worker + tests) a training step of the tiny model measured 17-55 s
# with torch's 2 spinning threads and 0.3-0.6 s with passive waiting. Set before torch is
# imported (every entry point imports leaml first); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
