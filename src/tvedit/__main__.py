from tvedit.cli.app import main

main()
