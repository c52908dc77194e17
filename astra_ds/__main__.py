import sys

from astra_ds.cli import main

sys.exit(main())
