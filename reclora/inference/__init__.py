"""Using a trained run: `Recommender.load(run_dir)`, then `score` and `rank` requests (see recommender.py).

The command line is `python -m reclora.predict`.
"""

from reclora.inference.recommender import Recommender
from reclora.inference.requests import UnknownItemError
from reclora.inference.run_folder import RunFolderError

__all__ = ["Recommender", "RunFolderError", "UnknownItemError"]
