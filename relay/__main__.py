from relay.console import main

main()
