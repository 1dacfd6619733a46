"""The argument parser of the two commands, ``python -m fusedrnn.bench`` and
``python -m fusedrnn.bench.plot``."""

import argparse


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: "<prog>: error: <message> (see --help)"."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
