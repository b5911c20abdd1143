"""`python -m reclora.train.report` is now `python -m reclora.analysis.report`: kept for old scripts."""

import sys
import warnings

if __name__ == "__main__":
    from reclora.analysis.report import main

    warnings.warn(
        "python -m reclora.train.report is python -m reclora.analysis.report now", FutureWarning, stacklevel=1
    )
    sys.exit(main())
