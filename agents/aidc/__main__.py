from aidc.cli.main import main

main()
