import sys

from tuplet.cni.plugin import main

sys.exit(main())
