import sys

from imtm.cli import main

sys.exit(main())
