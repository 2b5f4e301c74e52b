"""Imported first by each evaluation entry point when it runs as a file (`python eval/X.py`).

Python then puts eval/ at the front of sys.path, not the repository root, and `import eval` or
`import sdpo` fails (ModuleNotFoundError). This puts the root in eval/'s place, as `python -m
eval.X` run from the root has it, whatever the working directory. The entry points import it
only when they have no package (run as a file), so `python -m eval.X` and imports are untouched.
"""

import os
import sys

_EVAL = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_EVAL)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) not in (_EVAL, ROOT)]
