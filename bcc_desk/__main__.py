from bcc_desk.cli import main

main()
