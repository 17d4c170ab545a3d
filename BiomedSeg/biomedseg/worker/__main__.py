from .server import main
import sys
sys.exit(main())
