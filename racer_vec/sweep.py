"""`python -m racer_vec.sweep`, the documented command: runs racer_vec.tools.sweep (design §2, §12)."""

import sys

if __name__ == "__main__":
    # imported only when run: workers re-import this module as __mp_main__ and must not get JAX
    from racer_vec.tools.sweep import main

    sys.exit(main())
