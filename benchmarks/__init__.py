"""Speed benchmarks of aff_lightning, measured side by side on the machine they run on.

``python -m benchmarks.run`` (or ``make bench``) prints one table: the device-resident data path
against a per-image torchvision DataLoader, the Lightning module against a plain PyTorch loop,
the one-matmul affinity head against a linear softmax head and against the naive
``(N, C, M, D)`` formulation, and XLA graph compilations with the steady-state step time.
``benchmarks/RESULTS.md`` holds the latest table and the command that produced it.

Modules: :mod:`benchmarks.common` (timing, machine line, result rows, table),
:mod:`benchmarks.fakecifar` (random CIFAR-10-shaped data in the real file format),
:mod:`benchmarks.naive` (the naive affinity head the comparison uses), one module per benchmark
(:mod:`~benchmarks.data_path`, :mod:`~benchmarks.lightning_overhead`, :mod:`~benchmarks.head`,
:mod:`~benchmarks.xla_graphs`, :mod:`~benchmarks.training`) and :mod:`benchmarks.run`.
"""
