import sys

from astra_ds.cli.main import main

sys.exit(main())
