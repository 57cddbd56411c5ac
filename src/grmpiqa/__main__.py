import sys

from grmpiqa.cli import main

sys.exit(main())
