import sys

from pixart.cli.main import main

sys.exit(main())
