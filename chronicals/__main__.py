from chronicals_fx.cli import main

raise SystemExit(main())
