from shoprank.cli import main

raise SystemExit(main())
