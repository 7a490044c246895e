"""`python -m racer_vec.results`, the documented command: runs racer_vec.tools.results (design §2)."""

import sys

if __name__ == "__main__":
    # imported only when run: workers re-import this module as __mp_main__ and must not get JAX
    from racer_vec.tools.results import main

    sys.exit(main())
