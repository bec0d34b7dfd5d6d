import sys

from streamattn.cli import main

sys.exit(main())
