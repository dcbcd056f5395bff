from twisted.application.service import ServiceMaker

cimServer = ServiceMaker(
    "cim-server",
    "cim.server.tap",
    "A cim IM server (client TCP connections)",
    "cim-server",
)
cimRoute = ServiceMaker(
    "cim-route",
    "cim.route.tap",
    "The cim route (HTTP API, login, routing)",
    "cim-route",
)
cimClient = ServiceMaker(
    "cim-client", "cim.client.tap", "The cim console client (use with -n)", "cim-client"
)
cimStandalone = ServiceMaker(
    "cim-standalone",
    "cim.standalone",
    "A route and an IM server in one process, in memory by default",
    "cim-standalone",
)
