from weighted_mtp.cli import main

raise SystemExit(main())
