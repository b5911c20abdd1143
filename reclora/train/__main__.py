"""`python -m reclora.train --help`: the command line of reclora.train.run.

Exit codes: 0 done; 2 bad settings or input, a run folder in use by another run, or an
unreadable file of an earlier run (nothing written); 3 the loss diverged (the last good
checkpoint is kept); 4 the disk is full (every file is whole: free space, then --resume);
130 interrupted (resume with --resume).
"""

import sys

from reclora.data import DataFormatError
from reclora.files import NoSpaceLeft
from reclora.train.config import ConfigError, config_from_args
from reclora.train.loop import TrainingDiverged
from reclora.train.pipeline import run


def main(argv=None) -> int:
    try:
        run(config_from_args(argv))
    except (ConfigError, DataFormatError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except NoSpaceLeft as error:
        print(f"error: {error}; every file is whole: free some space, then rerun with --resume", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
