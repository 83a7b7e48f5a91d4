"""Published class splits, shipped as data (lists of names and numbers, no code).

- CIFAR-100's class names in label order (the ``meta`` pickle of ``cifar-100-python.tar.gz``) and each fine
  class's superclass; CIFAR-FS (Bertinetto et al. ICLR 2019: ``splits/bertinetto/{train,val,test}.txt`` of
  bertinetto/r2d2, as torchmeta's ``assets/cifar100/cifar-fs/*.json`` hold them); FC100's superclasses
  (Oreshkin et al. NeurIPS 2018, as torchmeta's ``assets/cifar100/fc100/*.json``).
- CUB-200-2011's 200 class folders, numbered 1..200 in ``images/``; FEAT's split (Ye et al. CVPR 2020,
  Sha-Lab/FEAT ``data/cub/split/{train,val,test}.csv``) and Meta-Dataset's (Triantafillou et al. ICLR
  2020, google-research/meta-dataset ``dataset_conversion/splits/cu_birds_splits.json``) as class numbers.
"""

from __future__ import annotations

CIFAR100_FINE: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm"
)

CIFAR100_COARSE: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2"
)

# the superclass (an index into CIFAR100_COARSE) of each fine class, in fine-label order
CIFAR100_SUPERCLASS: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0,
    11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13
)

CIFAR_FS: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin",
        "elephant", "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion",
        "lizard", "lobster", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree",
        "pear", "pine_tree", "plate", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal",
        "shrew", "skunk", "skyscraper", "snake", "spider", "squirrel", "streetcar", "sunflower", "tank",
        "tiger", "train", "trout", "tulip", "turtle", "willow_tree", "wolf"
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp",
        "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor"
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
        "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm"
    ),
}

FC100_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}

CUB_CLASSES: tuple[str, ...] = (
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani",
    "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet", "008.Rhinoceros_Auklet",
    "009.Brewer_Blackbird", "010.Red_winged_Blackbird", "011.Rusty_Blackbird", "012.Yellow_headed_Blackbird",
    "013.Bobolink", "014.Indigo_Bunting", "015.Lazuli_Bunting", "016.Painted_Bunting", "017.Cardinal",
    "018.Spotted_Catbird", "019.Gray_Catbird", "020.Yellow_breasted_Chat", "021.Eastern_Towhee",
    "022.Chuck_will_Widow", "023.Brandt_Cormorant", "024.Red_faced_Cormorant", "025.Pelagic_Cormorant",
    "026.Bronzed_Cowbird", "027.Shiny_Cowbird", "028.Brown_Creeper", "029.American_Crow", "030.Fish_Crow",
    "031.Black_billed_Cuckoo", "032.Mangrove_Cuckoo", "033.Yellow_billed_Cuckoo",
    "034.Gray_crowned_Rosy_Finch", "035.Purple_Finch", "036.Northern_Flicker", "037.Acadian_Flycatcher",
    "038.Great_Crested_Flycatcher", "039.Least_Flycatcher", "040.Olive_sided_Flycatcher",
    "041.Scissor_tailed_Flycatcher", "042.Vermilion_Flycatcher", "043.Yellow_bellied_Flycatcher",
    "044.Frigatebird", "045.Northern_Fulmar", "046.Gadwall", "047.American_Goldfinch",
    "048.European_Goldfinch", "049.Boat_tailed_Grackle", "050.Eared_Grebe", "051.Horned_Grebe",
    "052.Pied_billed_Grebe", "053.Western_Grebe", "054.Blue_Grosbeak", "055.Evening_Grosbeak",
    "056.Pine_Grosbeak", "057.Rose_breasted_Grosbeak", "058.Pigeon_Guillemot", "059.California_Gull",
    "060.Glaucous_winged_Gull", "061.Heermann_Gull", "062.Herring_Gull", "063.Ivory_Gull",
    "064.Ring_billed_Gull", "065.Slaty_backed_Gull", "066.Western_Gull", "067.Anna_Hummingbird",
    "068.Ruby_throated_Hummingbird", "069.Rufous_Hummingbird", "070.Green_Violetear",
    "071.Long_tailed_Jaeger", "072.Pomarine_Jaeger", "073.Blue_Jay", "074.Florida_Jay", "075.Green_Jay",
    "076.Dark_eyed_Junco", "077.Tropical_Kingbird", "078.Gray_Kingbird", "079.Belted_Kingfisher",
    "080.Green_Kingfisher", "081.Pied_Kingfisher", "082.Ringed_Kingfisher", "083.White_breasted_Kingfisher",
    "084.Red_legged_Kittiwake", "085.Horned_Lark", "086.Pacific_Loon", "087.Mallard",
    "088.Western_Meadowlark", "089.Hooded_Merganser", "090.Red_breasted_Merganser", "091.Mockingbird",
    "092.Nighthawk", "093.Clark_Nutcracker", "094.White_breasted_Nuthatch", "095.Baltimore_Oriole",
    "096.Hooded_Oriole", "097.Orchard_Oriole", "098.Scott_Oriole", "099.Ovenbird", "100.Brown_Pelican",
    "101.White_Pelican", "102.Western_Wood_Pewee", "103.Sayornis", "104.American_Pipit", "105.Whip_poor_Will",
    "106.Horned_Puffin", "107.Common_Raven", "108.White_necked_Raven", "109.American_Redstart",
    "110.Geococcyx", "111.Loggerhead_Shrike", "112.Great_Grey_Shrike", "113.Baird_Sparrow",
    "114.Black_throated_Sparrow", "115.Brewer_Sparrow", "116.Chipping_Sparrow", "117.Clay_colored_Sparrow",
    "118.House_Sparrow", "119.Field_Sparrow", "120.Fox_Sparrow", "121.Grasshopper_Sparrow",
    "122.Harris_Sparrow", "123.Henslow_Sparrow", "124.Le_Conte_Sparrow", "125.Lincoln_Sparrow",
    "126.Nelson_Sharp_tailed_Sparrow", "127.Savannah_Sparrow", "128.Seaside_Sparrow", "129.Song_Sparrow",
    "130.Tree_Sparrow", "131.Vesper_Sparrow", "132.White_crowned_Sparrow", "133.White_throated_Sparrow",
    "134.Cape_Glossy_Starling", "135.Bank_Swallow", "136.Barn_Swallow", "137.Cliff_Swallow",
    "138.Tree_Swallow", "139.Scarlet_Tanager", "140.Summer_Tanager", "141.Artic_Tern", "142.Black_Tern",
    "143.Caspian_Tern", "144.Common_Tern", "145.Elegant_Tern", "146.Forsters_Tern", "147.Least_Tern",
    "148.Green_tailed_Towhee", "149.Brown_Thrasher", "150.Sage_Thrasher", "151.Black_capped_Vireo",
    "152.Blue_headed_Vireo", "153.Philadelphia_Vireo", "154.Red_eyed_Vireo", "155.Warbling_Vireo",
    "156.White_eyed_Vireo", "157.Yellow_throated_Vireo", "158.Bay_breasted_Warbler",
    "159.Black_and_white_Warbler", "160.Black_throated_Blue_Warbler", "161.Blue_winged_Warbler",
    "162.Canada_Warbler", "163.Cape_May_Warbler", "164.Cerulean_Warbler", "165.Chestnut_sided_Warbler",
    "166.Golden_winged_Warbler", "167.Hooded_Warbler", "168.Kentucky_Warbler", "169.Magnolia_Warbler",
    "170.Mourning_Warbler", "171.Myrtle_Warbler", "172.Nashville_Warbler", "173.Orange_crowned_Warbler",
    "174.Palm_Warbler", "175.Pine_Warbler", "176.Prairie_Warbler", "177.Prothonotary_Warbler",
    "178.Swainson_Warbler", "179.Tennessee_Warbler", "180.Wilson_Warbler", "181.Worm_eating_Warbler",
    "182.Yellow_Warbler", "183.Northern_Waterthrush", "184.Louisiana_Waterthrush", "185.Bohemian_Waxwing",
    "186.Cedar_Waxwing", "187.American_Three_toed_Woodpecker", "188.Pileated_Woodpecker",
    "189.Red_bellied_Woodpecker", "190.Red_cockaded_Woodpecker", "191.Red_headed_Woodpecker",
    "192.Downy_Woodpecker", "193.Bewick_Wren", "194.Cactus_Wren", "195.Carolina_Wren", "196.House_Wren",
    "197.Marsh_Wren", "198.Rock_Wren", "199.Winter_Wren", "200.Common_Yellowthroat"
)

CUB_FEAT: dict[str, tuple[int, ...]] = {
    "train": (
        3, 5, 6, 8, 9, 11, 13, 15, 17, 19, 20, 23, 25, 27, 28, 31, 34, 38, 41, 44, 45, 46, 47, 52, 55, 56, 57,
        60, 61, 62, 63, 64, 67, 72, 74, 75, 76, 81, 84, 87, 90, 91, 93, 94, 97, 98, 99, 102, 107, 108, 109,
        110, 112, 113, 114, 119, 123, 124, 125, 126, 127, 130, 131, 132, 135, 137, 138, 139, 140, 142, 144,
        145, 146, 147, 150, 151, 153, 154, 155, 160, 161, 164, 169, 171, 176, 178, 179, 180, 181, 182, 183,
        184, 185, 186, 188, 190, 195, 196, 197, 198
    ),
    "val": (
        1, 2, 4, 7, 12, 14, 16, 21, 24, 36, 42, 43, 49, 50, 51, 53, 58, 65, 66, 69, 70, 77, 79, 85, 86, 92,
        95, 96, 101, 103, 105, 106, 111, 117, 120, 121, 122, 136, 156, 157, 159, 162, 163, 165, 168, 172, 187,
        192, 199, 200
    ),
    "test": (
        10, 18, 22, 26, 29, 30, 32, 33, 35, 37, 39, 40, 48, 54, 59, 68, 71, 73, 78, 80, 82, 83, 88, 89, 100,
        104, 115, 116, 118, 128, 129, 133, 134, 141, 143, 148, 149, 152, 158, 166, 167, 170, 173, 174, 175,
        177, 189, 191, 193, 194
    ),
}

CUB_META_DATASET: dict[str, tuple[int, ...]] = {
    "train": (
        1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27, 29, 31, 32, 33,
        34, 36, 37, 38, 40, 41, 42, 43, 47, 48, 49, 50, 53, 54, 56, 58, 59, 60, 62, 63, 65, 67, 69, 70, 71,
        73, 74, 75, 77, 78, 79, 81, 83, 86, 87, 88, 89, 90, 91, 92, 93, 95, 97, 98, 99, 100, 102, 104, 105,
        106, 107, 108, 109, 110, 111, 114, 115, 116, 117, 119, 120, 123, 124, 125, 126, 129, 130, 131, 132,
        135, 138, 139, 141, 142, 143, 144, 146, 149, 151, 152, 153, 154, 156, 157, 158, 160, 161, 164, 165,
        166, 167, 171, 173, 174, 175, 177, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191,
        192, 195, 196, 197
    ),
    "val": (
        44, 51, 52, 55, 57, 61, 64, 66, 68, 72, 76, 80, 84, 96, 113, 121, 127, 136, 140, 145, 150, 155, 159,
        162, 172, 176, 178, 198, 199, 200
    ),
    "test": (
        8, 9, 15, 20, 28, 30, 35, 39, 45, 46, 82, 85, 94, 101, 103, 112, 118, 122, 128, 133, 134, 137, 147,
        148, 163, 168, 169, 170, 193, 194
    ),
}
