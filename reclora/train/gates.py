"""`python -m reclora.train.gates` is now `python -m reclora.analysis.gates`: kept for old scripts."""

import sys
import warnings

if __name__ == "__main__":
    from reclora.analysis.gates import main

    warnings.warn("python -m reclora.train.gates is python -m reclora.analysis.gates now", FutureWarning, stacklevel=1)
    sys.exit(main())
