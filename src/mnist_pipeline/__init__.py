"""mnist_pipeline: the library behind the DVC stages and the `mnist-pipeline` command.

Importing any module here has no side effects: no directories, no tracking URI, no seeding.
"""

__version__ = "0.1.0"
