import sys

from codeling.cli import main

sys.exit(main())
