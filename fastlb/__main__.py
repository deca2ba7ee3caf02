import sys

from fastlb.cli import main

sys.exit(main())
