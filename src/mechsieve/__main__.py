from mechsieve.cli import main

raise SystemExit(main())
