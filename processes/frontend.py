"""Entry point of the HTTP frontend process."""

from tgi_zmq.frontend import main

if __name__ == "__main__":
    main()
