from qwenfast.cli import main

raise SystemExit(main())
