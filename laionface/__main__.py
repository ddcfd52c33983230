from laionface.cli import main

raise SystemExit(main())
