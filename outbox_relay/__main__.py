from outbox_relay.console import main

main()
