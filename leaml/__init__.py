"""LEAML Studio: label-efficient adaptation of vision-language models."""
import os

# OpenMP threads that wait for work by spinning burn the CPU other processes need: on a
# shared 2-core box (app + worker + tests) a training step of the tiny model measured 17-55 s
# with torch's 2 spinning threads and 0.3-0.6 s with passive waiting. Set before torch is
# imported (every entry point imports leaml first); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
