from edgeinfer.cli import main

raise SystemExit(main())
