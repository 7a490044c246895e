"""`python -m racer_vec.plot`, the documented command: runs racer_vec.tools.plot (design §2)."""

import sys

if __name__ == "__main__":
    # imported only when run: workers re-import this module as __mp_main__ and must not get JAX
    from racer_vec.tools.plot import main

    sys.exit(main())
